"""Model facts in an ONNX file's ``metadata_props``, in the form YOLOv5 tooling reads.

YOLOv5's DetectMultiBackend reads ``stride`` (the largest stride, an integer string such as "32") and
``names`` (a Python dict literal such as "{0: 'circle', 1: 'rect'}"); se-deploy adds the input size,
class count, batch, SE block count and provenance. Every value is a Python literal (read back with
``ast.literal_eval``), except the checksum and version strings.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import onnx

from se_deploy.errors import SeDeployError, first_line


@dataclass(frozen=True)
class OnnxMetadata:
    """What an se-deploy (or YOLOv5) ONNX says about itself; None where a key is absent."""

    stride: int | None = None
    names: dict[int, str] | None = None
    imgsz: tuple[int, int] | None = None
    nc: int | None = None
    batch: int | None = None
    dynamic: bool | None = None
    se_blocks: int | None = None
    source_sha256: str | None = None
    se_deploy_version: str | None = None

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` strings for every field that is set."""
        props = {
            "stride": None if self.stride is None else str(int(self.stride)),
            "names": None if self.names is None else repr({int(k): str(v) for k, v in self.names.items()}),
            "imgsz": None if self.imgsz is None else repr([int(v) for v in self.imgsz]),
            "nc": None if self.nc is None else str(int(self.nc)),
            "batch": None if self.batch is None else str(int(self.batch)),
            "dynamic": None if self.dynamic is None else repr(bool(self.dynamic)),
            "se_blocks": None if self.se_blocks is None else str(int(self.se_blocks)),
            "source_sha256": self.source_sha256,
            "se_deploy_version": self.se_deploy_version,
        }
        return {k: v for k, v in props.items() if v is not None}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> OnnxMetadata:
        """Parse ``metadata_props``; values that do not parse are treated as absent."""

        def literal(key, kind):
            try:
                value = ast.literal_eval(props[key])
            except (KeyError, ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
            return value if isinstance(value, kind) else None

        names = literal("names", (dict, list, tuple))
        if isinstance(names, (list, tuple)):
            names = dict(enumerate(names))
        imgsz = literal("imgsz", (list, tuple, int))
        if isinstance(imgsz, int):
            imgsz = (imgsz, imgsz)
        return cls(
            stride=literal("stride", int),
            names=None if names is None else {int(k): str(v) for k, v in names.items()},
            imgsz=tuple(int(v) for v in imgsz) if imgsz and len(imgsz) == 2 else None,
            nc=literal("nc", int),
            batch=literal("batch", int),
            dynamic=literal("dynamic", bool),
            se_blocks=literal("se_blocks", int),
            source_sha256=props.get("source_sha256"),
            se_deploy_version=props.get("se_deploy_version"),
        )


def write_metadata(model: onnx.ModelProto, metadata: OnnxMetadata) -> dict[str, str]:
    """Set the metadata's keys on ``model`` (other keys are kept); returns the strings written."""
    props = metadata.to_props()
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return props


def read_props(source: str | Path | onnx.ModelProto) -> dict[str, str]:
    """The raw ``metadata_props`` of a model or an ONNX file."""
    if not isinstance(source, onnx.ModelProto):
        from google.protobuf.message import DecodeError

        try:
            source = onnx.load(str(source), load_external_data=False)
        except (OSError, DecodeError, ValueError) as e:
            raise SeDeployError(f"{source}: not a readable ONNX model ({first_line(e)})") from None
    return {p.key: p.value for p in source.metadata_props}


def read_metadata(source: str | Path | onnx.ModelProto) -> OnnxMetadata:
    """Parsed metadata of a model or an ONNX file."""
    return OnnxMetadata.from_props(read_props(source))
