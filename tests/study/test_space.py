"""The search-space grammar: one Domain per key, every point it can produce checked before anything runs."""

import optuna
import pytest
from ray import tune

from study.space import Domain, SpaceError
from study.spec import SpecError, load


def write_search(tmp_path, domain: str, name: str = "copy") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"kind: search\ndescription: d\nspace:\n  model.window: {domain}\n")
    return str(path)


@pytest.mark.parametrize("domain,bad", [("{choice: [16, 48]}", "48"), ("{randint: [1, 300]}", "3")])
def test_values_valid_alone_but_not_with_the_base_config_are_refused(tmp_path, domain, bad):
    # 48 (and 3, ..., 299) do not divide the synthetic preset's visual_length 128
    with pytest.raises(SpecError) as err:
        load(write_search(tmp_path, domain))
    message = str(err.value)
    assert "copy.yaml" in message and f"space.model.window: value {bad} " in message
    assert "must divide model.visual_length (128)" in message


def test_every_point_of_a_product_is_checked(tmp_path):
    path = tmp_path / "pair.yaml"
    path.write_text("kind: search\ndescription: d\nspace:\n  model.window: {choice: [16, 32]}\n"
                    "  model.visual_length: {choice: [128, 48]}\n")
    with pytest.raises(SpecError, match=r"model.window=32, space.model.visual_length=48"):
        load(str(path))


def test_quniform_step_must_be_positive(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("kind: search\ndescription: d\nspace:\n  model.sigma: {quniform: [0.5, 2.0, 0]}\n")
    with pytest.raises(SpecError, match="quniform needs a step q > 0"):
        load(str(path))


def test_domain_forms_agree():
    d = Domain.parse("model.prompt_prefix", {"randint": [0, 17]})
    assert d.points() == list(range(17)) and d.corners() == [0, 16]
    dist = d.optuna()  # Tune's randint excludes 17, Optuna's IntDistribution includes its high
    assert isinstance(dist, optuna.distributions.IntDistribution) and (dist.low, dist.high) == (0, 16)
    assert isinstance(d.tune(), tune.search.sample.Integer)
    assert d.value("5") == 5 and d.value("5.0") == 5
    c = Domain.parse("model.window", {"choice": [8, 16]})
    assert c.value("16") == 16 and c.value("16.0") == 16
    with pytest.raises(ValueError):
        c.value("12")
    q = Domain.parse("model.sigma", {"quniform": [0.5, 2.2, 0.5]})
    assert q.corners() == [0.5, 2.0] and q.points() == [0.5, 1.0, 1.5, 2.0]


@pytest.mark.parametrize("raw,needle", [
    ({"gaussian": [0, 1]}, "unknown domain"), ({"uniform": [2, 1]}, "low < high"),
    ({"loguniform": [0, 1]}, "low > 0"), ({"randint": [0.5, 3]}, "integer bounds"), ("x", "expected one of"),
])
def test_bad_domains(raw, needle):
    with pytest.raises(SpaceError, match=needle):
        Domain.parse("model.sigma" if "randint" not in raw else "model.window", raw)


def test_optuna_twins_of_every_kind():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def dist(key, raw):
        return Domain.parse(key, raw).optuna()

    assert dist("model.window", {"choice": [4, 8]}) == CategoricalDistribution((4, 8))
    assert dist("model.sigma", {"uniform": [0.5, 1.0]}) == FloatDistribution(0.5, 1.0)
    assert dist("loss.cts_weight", {"loguniform": [1e-5, 1.0]}) == FloatDistribution(1e-5, 1.0, log=True)
    assert dist("model.prompt_prefix", {"randint": [0, 17]}) == IntDistribution(0, 16)  # Tune excludes 17
    assert dist("model.sigma", {"quniform": [0.25, 1.0, 0.25]}) == FloatDistribution(0.25, 1.0, step=0.25)
    assert Domain.parse("model.window_overlap", {"choice": [True, False]}).value("True") is True
