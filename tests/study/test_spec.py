"""The study YAML maps onto StudySpec's fields: keys, types and defaults come from the dataclasses; nested blocks are
frozen dataclasses that read as the dicts callers always had."""

import copy
import json
import pickle
from dataclasses import FrozenInstanceError, fields, replace
from pathlib import Path

import pytest

from study.spec import Block, Resources, Scheduler, SpecError, StudySpec, Variant, available, load, parse

PATH = Path("t.yaml")
ABLATION = {"kind": "ablation", "description": "d", "variants": [{"name": "a"}, {"name": "b"}]}
SEARCH = {"kind": "search", "description": "d", "space": {"model.sigma": {"uniform": [0.5, 2.0]}}}


def error(raw: dict) -> str:
    with pytest.raises(SpecError) as err:
        parse(raw, PATH)
    return str(err.value)


def test_the_yaml_keys_are_the_fields_in_their_order():
    keys = [f.name for f in fields(StudySpec) if f.name != "path"]
    assert error({**ABLATION, "max_epochs": 3}) == f"t.yaml: unknown key 'max_epochs'; allowed: {', '.join(keys)}"
    for key in ("resources", "confirm", "seeds_auto"):
        allowed = ", ".join(f.name for f in fields(getattr(parse(SEARCH, PATH), key)))
        assert error({**SEARCH, key: {"x": 1}}) == f"t.yaml: {key}: unknown key 'x'; allowed: {allowed}"
    assert error({**SEARCH, "scheduler": {"x": 1}}) == \
        "t.yaml: scheduler: unknown key 'x'; allowed: type, grace_period, reduction_factor"  # not `order`
    assert error({**ABLATION, "variants": [{"name": "a", "sett": {}}]}) == \
        "t.yaml: variants[0]: unknown key 'sett'; allowed: name, set, paper, variant"


@pytest.mark.parametrize("change,message", [
    ({"seeds": True}, "key 'seeds' must be a int, got True"),
    ({"full": None}, "key 'full' must be a str, got None"),  # X | None: null is refused, the key left out
    ({"paper_table": None}, "key 'paper_table' must be a int, got None"),
    ({"fuse_seeds": 1.5}, "key 'fuse_seeds' must be a int/str, got 1.5"),
    ({"columns": "auc"}, "key 'columns' must be a list, got 'auc'"),  # tuple fields are written as lists
    ({"resources": [1]}, "key 'resources' must be a dict, got [1]"),  # blocks as mappings
    ({"resources": {"cpu": True}}, "resources: key 'cpu' must be a int/float, got True"),
    ({"seeds_auto": {"cap": 2.5}}, "seeds_auto: key 'cap' must be a int, got 2.5"),
    ({"reuse_workers": 1}, "key 'reuse_workers' must be a bool, got 1"),
])
def test_types_come_from_the_annotations(change, message):
    assert error({**ABLATION, **change}) == f"t.yaml: {message}"


@pytest.mark.parametrize("base,change,message", [
    (ABLATION, {"kind": "grid"}, "kind 'grid' unknown; allowed: ablation, search"),
    (ABLATION, {"metric": "map@0.1"}, "metric 'map@0.1' unknown; allowed: auto, auc, ap, ano_auc, map_avg"),
    (ABLATION, {"max_concurrent": -1}, "max_concurrent must be >= 0 (0 = as many as resources allow), got -1"),
    (ABLATION, {"max_failures": -1}, "max_failures must be >= 0, got -1"),
    (ABLATION, {"resources": {"gpu": -1}}, "resources need cpu > 0 and gpu >= 0, got {'gpu': -1}"),
    (SEARCH, {"scheduler": {"type": "pbt"}}, "scheduler.type 'pbt' unknown; allowed: asha, fifo"),
    (SEARCH, {"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor must be >= 2, got 1"),
    (SEARCH, {"scheduler": {"reduction_factor": 1, "grace_period": 0}}, "scheduler.grace_period must be >= 1, got 0"),
    (SEARCH, {"confirm": {"seeds": 0}},
     "confirm needs top >= 0 (0 = no confirmation stage) and seeds >= 1, got {'seeds': 0}"),
    (SEARCH, {"seeds_auto": {"cap": 1, "target": 2}},
     "seeds_auto needs target > 0 (points) and cap >= 2, got {'cap': 1, 'target': 2}"),
    (ABLATION, {"confirm": {"top": 1}}, "'confirm' belongs to kind 'search' (its confirmation stage), not 'ablation'"),
    (ABLATION, {"full": "z"}, "full 'z' is not one of the variants ['a', 'b']"),
    (ABLATION, {"variants": [{"name": "a"}, {"name": "a"}]}, "variant names must be unique, got ['a', 'a']"),
    (ABLATION, {"variants": [{"set": {}}]}, "variants[0]: missing required key 'name'"),
    (ABLATION, {"variants": [{"name": "a", "variant": "x"}]},
     "variants[0]: variant 'x' unknown; allowed: official, paper"),
    (SEARCH, {"full": "a"}, "'full' belongs to kind 'ablation', not 'search'"),
])
def test_rules_and_blocks_check_themselves(base, change, message):
    assert error({**base, **change}) == f"t.yaml: {message}"


def test_missing_keys_and_the_name():
    assert error({"description": "d"}) == "t.yaml: missing required key 'kind'"
    assert error({"kind": "search"}) == "t.yaml: missing required key 'description'"
    assert error({**SEARCH, "name": "u"}).startswith("t.yaml: name 'u' differs from the file's name 't'")
    assert parse({**SEARCH, "name": "t"}, PATH).name == "t"


def test_several_errors_report_the_first_field():
    assert error({**ABLATION, "metric": "x", "preset": "y"}).startswith("t.yaml: preset 'y' unknown")


def test_defaults_come_from_the_fields_and_the_kind():
    a, s = parse(ABLATION, PATH), parse(SEARCH, PATH)
    assert (a.seeds, a.full, a.confirm, s.seeds, s.full, s.confirm) == (3, "b", {"top": 0, "seeds": 1}, 1, None,
                                                                         {"top": 3, "seeds": 3})
    for spec in (a, s):
        assert repr(spec.resources) == "{'cpu': 1, 'gpu': 0}" and repr(spec.scheduler) == "{'type': 'asha'}"
        assert repr(spec.seeds_auto) == "{'target': 1.0, 'cap': 10}"
        assert (spec.preset, spec.variant, spec.metric, spec.num_samples, spec.max_concurrent, spec.max_failures,
                spec.reuse_workers, spec.fuse_seeds, spec.columns) == ("synthetic", "official", "auto", 1, 0, 1, True,
                                                                       "auto", ("auc", "ap", "ano_auc", "map_avg"))
    assert parse({**SEARCH, "seeds_auto": {"target": 2}}, PATH).seeds_auto == {"target": 2, "cap": 10}
    assert parse({**ABLATION, "confirm": {}}, PATH).confirm == {"top": 0, "seeds": 1}


def test_blocks_are_frozen_dicts():
    spec = parse({**SEARCH, "resources": {"gpu": 0.5}, "confirm": {"top": 1}}, PATH)
    assert isinstance(spec.resources, dict) and spec.resources == {"cpu": 1, "gpu": 0.5}
    assert (spec.resources["gpu"], spec.resources.gpu, spec.fuse_size()) == (0.5, 0.5, 5)
    assert dict(spec.confirm) == {"top": 1, "seeds": 3} and spec.confirm.top == 1
    for mutate in (lambda: spec.resources.__setitem__("cpu", 2), lambda: spec.resources.update(cpu=2),
                   lambda: spec.confirm.pop("top"), lambda: spec.scheduler.clear(),
                   lambda: spec.seeds_auto.setdefault("x", 1)):
        with pytest.raises(TypeError, match="frozen"):
            mutate()
    with pytest.raises(FrozenInstanceError):
        spec.resources.cpu = 2  # type: ignore[misc]
    assert replace(spec.resources, cpu=2) == {"cpu": 2, "gpu": 0.5}
    for twin in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec), copy.copy(spec)):
        assert twin == spec and type(twin.resources) is Resources and repr(twin) == repr(spec)
    assert json.loads(json.dumps(spec.confirm)) == {"top": 1, "seeds": 3}


def test_the_scheduler_keeps_the_yaml_order():
    spec = parse({**SEARCH, "scheduler": {"reduction_factor": 3, "type": "fifo", "grace_period": 2}}, PATH)
    assert list(spec.scheduler.items()) == [("type", "fifo"), ("reduction_factor", 3), ("grace_period", 2)]
    assert spec.scheduler == {"type": "fifo", "grace_period": 2, "reduction_factor": 3}  # dict equality: any order
    assert (spec.scheduler.type, spec.scheduler.grace_period, spec.scheduler.reduction_factor) == ("fifo", 2, 3)
    only = parse({**SEARCH, "scheduler": {"grace_period": 2}}, PATH).scheduler
    assert only == {"type": "asha", "grace_period": 2} and only.get("reduction_factor", 2) == 2
    assert Scheduler(grace_period=4) == {"type": "asha", "grace_period": 4}


def test_a_variant_reads_set_as_its_overrides():
    spec = parse({**ABLATION, "variants": [{"name": "a", "set": {"model.window": 8}, "variant": "paper",
                                            "paper": {"ucf": {"auc": 88.0}}}]}, PATH)
    assert spec.variants == (Variant("a", {"model.window": 8}, {"ucf": {"auc": 88.0}}, "paper"),)
    assert spec.variants[0].paper_values("ucf") == {"auc": 88.0} and spec.variants[0].paper_values("xd") == {}


@pytest.mark.parametrize("name", sorted(available()))
def test_every_shipped_study_has_its_blocks(name):
    spec = load(name)
    assert all(isinstance(getattr(spec, f), Block) for f in ("resources", "scheduler", "confirm", "seeds_auto"))
    assert spec.name == name and spec.confirm["top"] == (0 if spec.kind == "ablation" else 3)
