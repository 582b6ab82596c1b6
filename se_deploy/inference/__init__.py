"""Inference on video, images and streams: sources, pre/post-processing, the threaded pipeline, outputs, bench."""
