"""Streaming pretraining input (grain): sources, decode/resize/crop, the pipeline, and
double-buffered device prefetch. See pipeline.py for the order contract."""

from auxtl.streaming.pipeline import (EvalImages, StreamData, default_workers,
                                      normalization_sample, parse_image_size,
                                      pipeline_images_per_s, prepare_stream, train_batches)
from auxtl.streaming.prefetch import device_prefetch
from auxtl.streaming.sources import is_stream_spec, open_source

__all__ = ["EvalImages", "StreamData", "default_workers", "device_prefetch",
           "is_stream_spec", "normalization_sample", "open_source", "parse_image_size",
           "pipeline_images_per_s", "prepare_stream", "train_batches"]
