"""MediaPipe face detector + face mesh, mapped to iBUG-68 landmarks: real landmarks, no download.

MediaPipe 0.10.21 (Apache-2.0) ships its legacy ``solutions`` graphs *with* their ``.tflite``
models inside the wheel (``mediapipe/modules/face_detection/*.tflite``,
``mediapipe/modules/face_landmark/face_landmark.tflite``); from 0.10.30 on the wheel has only the
Tasks API, which needs a separately downloaded ``.task`` file. So this module pins 0.10.21 (see
requirements-nodeps.txt for why it is installed with ``--no-deps``).

Two stages per frame:

1. the full-range face detector (``model_selection=1``, faces up to ~5 m from the camera) on a copy
   of the frame downscaled to ``detect_max_side``: every face's box and score;
2. for each face, largest first (at most ``max_faces``), the 468-point face mesh on a square crop
   around that box (side ``mesh_crop_scale`` x the box's larger side, resized to ``mesh_input``
   pixels): inside the crop the face is large, which the mesh's own short-range detector needs;
   the mesh is then mapped back to frame pixels and reduced to the 68 iBUG points below.

A face whose mesh cannot be fitted, or whose mesh lies outside its detector box, is not reported:
a box without landmarks would make MuseTalk's crop rule guess, and tracking fills short misses.

iBUG-68 from the 468-point mesh
-------------------------------
``IBUG68_FROM_MESH[i]`` is the mesh vertex used for iBUG point ``i``. The table was chosen from
anatomical correspondences (mediapipe's FACE_OVAL ring for the jaw, its eye, brow and lip contour
lists), kept mirror-symmetric (a left point's vertex is the mirror vertex of its right partner),
and checked against dlib's 68-point predictor on the astronaut photo (14 scaled, rotated and
mirrored views): the median distance per point is 3.1 % of the outer-eye-corner distance on
average (jaw 2.4-8.7 %, brows, nose, eyes and lips 0.9-5.7 %). iBUG's own orientation is kept: 0-16 run along the
jaw from the image's left to its right with the chin at 8.

====== ========================= ===========================================================
iBUG   region                    mesh vertices
====== ========================= ===========================================================
0-16   jaw, image left to right  127 93 132 58 172 136 149 148 152 377 378 365 397 288 361 323 356
17-21  brow, image left          70 63 105 65 55
22-26  brow, image right         285 295 334 293 300
27-30  nose bridge, down         168 197 5 4
31-35  nostrils, left to right   75 97 2 326 305
36-41  eye, image left           33 160 158 133 153 144   (outer corner, upper lid, inner corner, lower lid)
42-47  eye, image right          362 385 387 263 373 380  (inner corner, upper lid, outer corner, lower lid)
48-59  outer lips, clockwise     61 39 37 0 267 269 291 321 314 17 84 91
60-67  inner lips, clockwise     78 82 13 312 308 317 14 87
====== ========================= ===========================================================
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

import cv2
import numpy as np

from lipsync_runner.errors import ModelFilesError
from lipsync_runner.faces.detectors.base import NUM_LANDMARKS, FaceDetection, as_batch, downscale_factor

logger = logging.getLogger(__name__)

#: The pinned MediaPipe release: the last one whose wheel bundles the legacy solutions' models.
MEDIAPIPE_VERSION = "0.10.21"

IBUG68_FROM_MESH: tuple[int, ...] = (
    127, 93, 132, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 361, 323, 356,  # jaw 0-16
    70, 63, 105, 65, 55,  # brow 17-21
    285, 295, 334, 293, 300,  # brow 22-26
    168, 197, 5, 4,  # nose bridge 27-30
    75, 97, 2, 326, 305,  # nostrils 31-35
    33, 160, 158, 133, 153, 144,  # eye 36-41
    362, 385, 387, 263, 373, 380,  # eye 42-47
    61, 39, 37, 0, 267, 269, 291, 321, 314, 17, 84, 91,  # outer lips 48-59
    78, 82, 13, 312, 308, 317, 14, 87,  # inner lips 60-67
)
MESH_POINTS = 468


def mesh_to_ibug68(mesh: np.ndarray) -> np.ndarray:
    """``(468, 2+)`` face-mesh points -> ``(68, 2)`` iBUG-68 points (same coordinates)."""
    mesh = np.asarray(mesh)
    if mesh.ndim != 2 or mesh.shape[0] < MESH_POINTS or mesh.shape[1] < 2:
        raise ValueError(f"expected a (468, 2) face mesh, got {mesh.shape}")
    return mesh[list(IBUG68_FROM_MESH), :2].astype(np.float64)


def _import_mediapipe():
    # The C++ side logs every graph start on stderr; warnings and info are noise for a service.
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import mediapipe as mp
    except ImportError as exc:
        raise ModelFilesError(
            f"the MediaPipe face detector needs mediapipe=={MEDIAPIPE_VERSION} "
            f"(pip install --no-deps -r requirements-nodeps.txt): {exc}") from exc
    solutions = getattr(mp, "solutions", None)
    if solutions is None or not hasattr(solutions, "face_mesh"):
        raise ModelFilesError(
            f"mediapipe {getattr(mp, '__version__', '?')} has no bundled face mesh (legacy solutions); "
            f"install mediapipe=={MEDIAPIPE_VERSION}")
    return mp


def mediapipe_available() -> bool:
    """True when the pinned mediapipe (with its bundled face models) can be imported."""
    try:
        _import_mediapipe()
    except ModelFilesError:
        return False
    return True


class MediaPipeFaceDetector:
    """All faces per frame (largest first) with iBUG-68 landmarks from MediaPipe; CPU, no download.

    ``detect`` follows the detector protocol: ``list[list[FaceDetection]]``, one list per frame.
    Calls are serialised (MediaPipe graphs keep per-call state). Within a call the two graphs run
    side by side: the box detector finds frame i+1's faces on a helper thread while the mesh fits
    frame i's. Each graph still sees the same frames in the same order, so the results are those of
    one frame after the other. On 2 busy cores the tracking pass's detection time fell from 11.5 to
    9.3-10.0 ms per 720p frame (docs/benchmarks.md); with a free core it tends to the slower graph's.
    """

    name = "mediapipe"

    def __init__(
        self,
        *,
        max_faces: int = 4,
        min_detection_confidence: float = 0.5,
        detect_max_side: int = 640,
        mesh_crop_scale: float = 1.8,
        mesh_input: int = 256,
    ) -> None:
        mp = _import_mediapipe()
        self.max_faces = max(1, int(max_faces))
        self.detect_max_side = detect_max_side
        self.mesh_crop_scale = float(mesh_crop_scale)
        self.mesh_input = int(mesh_input)
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_detection_confidence)
        # static_image_mode: every call detects afresh, so results do not depend on call order
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=1, refine_landmarks=False, min_detection_confidence=0.3)
        self._lock = threading.Lock()
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lipsync-face-boxes")

    def close(self) -> None:
        with self._lock:
            self._ahead.shutdown(wait=True)
            self._detector.close()
            self._mesh.close()

    def detect(self, frames: np.ndarray) -> list[list[FaceDetection]]:
        frames = as_batch(frames)
        out: list[list[FaceDetection]] = []
        with self._lock:
            ahead: Future | None = None
            try:
                frames = [np.ascontiguousarray(f) for f in frames]  # views: each frame of a chunk is contiguous
                for i, frame in enumerate(frames):
                    boxes = ahead.result() if ahead is not None else self._boxes(frame)
                    ahead = self._ahead.submit(self._boxes, frames[i + 1]) if i + 1 < len(frames) else None
                    out.append(self._with_meshes(frame, boxes))
            finally:  # the next call may not start while the box graph is still busy with this one
                wait([ahead] if ahead is not None else [])
        return out

    # -- internals ------------------------------------------------------------------------

    def _boxes(self, frame: np.ndarray) -> list[tuple[np.ndarray, float]]:
        h, w = frame.shape[:2]
        s = downscale_factor((h, w), self.detect_max_side)
        small = frame if s >= 1.0 else cv2.resize(
            frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        result = self._detector.process(small)
        boxes = []
        for det in result.detections or ():
            rb = det.location_data.relative_bounding_box
            box = np.array([rb.xmin * w, rb.ymin * h, (rb.xmin + rb.width) * w, (rb.ymin + rb.height) * h])
            box[[0, 2]] = np.clip(box[[0, 2]], 0, w)
            box[[1, 3]] = np.clip(box[[1, 3]], 0, h)
            if box[2] - box[0] >= 4 and box[3] - box[1] >= 4:
                boxes.append((box, float(det.score[0]) if det.score else 0.0))
        boxes.sort(key=lambda b: -(b[0][2] - b[0][0]) * (b[0][3] - b[0][1]))
        return boxes[: self.max_faces]

    def _mesh_in_box(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """(468, 2) mesh in frame pixels for the face in ``box``, or None."""
        side = self.mesh_crop_scale * max(box[2] - box[0], box[3] - box[1])
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x0, y0 = cx - side / 2, cy - side / 2
        scale = self.mesh_input / side
        # one affine warp = crop + resize, with black outside the frame
        m = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]], np.float64)
        crop = cv2.warpAffine(frame, m, (self.mesh_input, self.mesh_input), flags=cv2.INTER_AREA
                              if scale < 1 else cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        result = self._mesh.process(crop)
        if not result.multi_face_landmarks:
            return None
        pts = result.multi_face_landmarks[0].landmark
        rel = np.array([(p.x, p.y) for p in pts], np.float64)
        if len(rel) < MESH_POINTS:
            return None
        mesh = rel[:MESH_POINTS] * side + np.array([x0, y0])
        # the mesh's own detector may have picked another face in the crop: it must be this one
        centre = np.median(mesh, axis=0)
        if not (box[0] <= centre[0] <= box[2] and box[1] <= centre[1] <= box[3]):
            return None
        return mesh

    def _with_meshes(self, frame: np.ndarray, boxes: list[tuple[np.ndarray, float]]) -> list[FaceDetection]:
        out = []
        for box, score in boxes:
            mesh = self._mesh_in_box(frame, box)
            if mesh is None:
                continue
            lm = mesh_to_ibug68(mesh)
            out.append(FaceDetection(box=box, landmarks=lm.reshape(NUM_LANDMARKS, 2), score=score))
        return out
