"""Frozen-CLIP feature extraction: videos → one `(T, D)` float32 `.npy` per video and crop, plus the list CSV.

    python -m vadclip.extract VIDEOS OUT [--crops 10|5|1] [--snippet mean|middle] [--clip-weights PATH] ...

Layout written (what the trainer reads): `OUT/<label>/<video>__<k>.npy` for crops k = 0..n-1, and
`OUT/<list_name>.csv` with header `path,label` (absolute paths). T = ceil(frames / 16): a last partial
snippet is kept and uses the frames it has. See docs/extraction.md for the choices and their reasons.

One module per concern, each importing only those listed before it:
  errors, options   ExtractError / VideoError; the crop geometry and the options' choices and defaults
  preprocess        the authors' crops of a frame, open_clip's eval normalisation
  video             decoding (PyAV; a frame folder's images with PIL): frames, 16-frame snippets, batches of crops,
                    the decode thread
  encode            CLIP's image tower over a video: (crops, T, D) per-snippet embeddings
  jobs              the videos under VIDEOS (video files and frame folders) and their labels
  write             the `.npy` files, the list CSV, the manifest a resumed run must match
  summary           what a run did, its progress bars, one video's outcome recorded
  cluster           the same encoding on Ray actors (`--address`): the one module of `vadclip` that imports Ray
  api               `extract_videos`, local or on a cluster (imports `cluster`, hence Ray, only for a cluster run)
  cli, __main__     `python -m vadclip.extract`
This package re-exports the public names, so `from vadclip.extract import extract_videos` works as before.
"""

from vadclip.extract.api import extract_videos
from vadclip.extract.cli import build_parser, main
from vadclip.extract.encode import RANDOM_WEIGHTS_SEED, encode_video, load_clip
from vadclip.extract.errors import ExtractError, VideoError
from vadclip.extract.jobs import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    VideoJob,
    find_videos,
    frame_sort_key,
    is_frame_folder,
    list_frames,
    make_jobs,
    read_label_file,
    video_key,
)
from vadclip.extract.options import (
    CROP_CHOICES,
    CROP_SIZE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CLIP_MODEL,
    DEFAULT_CROPS,
    DEFAULT_LIST_NAME,
    DEFAULT_SNIPPET,
    RESIZE_WH,
    SNIPPET_CHOICES,
)
from vadclip.extract.preprocess import Preprocess, clip_eval_transform, crop_boxes, crop_frames, crop_stack
from vadclip.extract.summary import ExtractSummary, progress_bars, record_video
from vadclip.extract.video import (
    DECODE_ERRORS,
    FrameFolder,
    advertised_frames,
    frame_to_rgb,
    iter_frames,
    iter_image_frames,
    prefetch,
    short_by_too_much,
    snippet_frames,
    snippets,
)
from vadclip.extract.write import (
    MANIFEST_NAME,
    NORMAL_LABELS,
    check_manifest,
    is_complete,
    remove_stray_temps,
    save_npy_atomic,
    write_features,
    write_list,
)

__all__ = [
    "CROP_CHOICES", "CROP_SIZE", "DECODE_ERRORS", "DEFAULT_BATCH_SIZE", "DEFAULT_CLIP_MODEL", "DEFAULT_CROPS",
    "DEFAULT_LIST_NAME", "DEFAULT_SNIPPET", "IMAGE_EXTS", "MANIFEST_NAME", "NORMAL_LABELS", "RANDOM_WEIGHTS_SEED",
    "RESIZE_WH", "SNIPPET_CHOICES", "VIDEO_EXTS", "ExtractError", "ExtractSummary", "FrameFolder", "Preprocess",
    "VideoError", "VideoJob", "advertised_frames", "build_parser", "check_manifest", "clip_eval_transform",
    "crop_boxes", "crop_frames", "crop_stack", "encode_video", "extract_videos", "find_videos", "frame_sort_key",
    "frame_to_rgb", "is_complete", "is_frame_folder", "iter_frames", "iter_image_frames", "list_frames",
    "load_clip", "main", "make_jobs", "prefetch", "progress_bars", "read_label_file", "record_video",
    "remove_stray_temps", "save_npy_atomic", "short_by_too_much", "snippet_frames", "snippets", "video_key",
    "write_features", "write_list",
]
