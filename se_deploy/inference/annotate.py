"""Drawing detections on a frame, in place: a box per detection, labelled with class name and confidence."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_colour(cls: int) -> tuple[int, int, int]:
    """A saturated BGR colour per class; hues are spread by the golden ratio so neighbours differ."""
    r, g, b = colorsys.hsv_to_rgb((cls * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


class Annotator:
    """Draws detections (rows x1, y1, x2, y2, conf, cls in frame pixels) on frames of one size."""

    def __init__(self, names: dict[int, str], frame_hw: tuple[int, int]):
        self.names = names
        self.line = max(round(sum(frame_hw) / 2 * 0.003), 2)  # thicker lines on bigger frames
        self.font_scale = self.line / 3
        self.font_thickness = max(self.line - 1, 1)
        self._colours: dict[int, tuple[int, int, int]] = {}

    def label(self, cls: int, conf: float) -> str:
        return f"{self.names.get(cls, str(cls))} {conf:.2f}"

    def draw(self, frame: np.ndarray, dets: np.ndarray) -> np.ndarray:
        """Draw every detection on ``frame`` (modified and returned)."""
        if not len(dets):
            return frame
        boxes = dets[:, :4].round().astype(np.int32)
        for (x1, y1, x2, y2), conf, cls in zip(boxes.tolist(), dets[:, 4].tolist(), dets[:, 5].astype(int).tolist()):
            colour = self._colours.get(cls) or self._colours.setdefault(cls, class_colour(cls))
            # Axis-aligned rectangles look the same without anti-aliasing, at less than half the cost.
            cv2.rectangle(frame, (x1, y1), (x2, y2), colour, self.line, cv2.LINE_8)
            text = self.label(cls, conf)
            (tw, th), _ = cv2.getTextSize(text, FONT, self.font_scale, self.font_thickness)
            above = y1 - th - 3 >= 0  # label above the box unless it would leave the frame
            top = y1 - th - 3 if above else y1
            cv2.rectangle(frame, (x1, top), (x1 + tw, top + th + 3), colour, -1, cv2.LINE_8)
            cv2.putText(frame, text, (x1, top + th + 1), FONT, self.font_scale, (255, 255, 255),
                        self.font_thickness, cv2.LINE_AA)
        return frame
