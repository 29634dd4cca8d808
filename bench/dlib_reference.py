"""Record dlib's 68 landmarks on the astronaut photo: the reference tests/test_mediapipe.py holds
MediaPipe's mapped landmarks and crop boxes to (dlib is not a dependency of this project).

Needs dlib and its 68-point predictor, e.g. in a scratch venv:
    pip install dlib-bin==20.0.1.post1 face-recognition-models==0.3.0
    python bench/dlib_reference.py > tests/data/astronaut_dlib68.json
(The predictor is trained on iBUG 300-W, whose licence excludes commercial use: a test
reference only, never shipped.)
"""

from __future__ import annotations

import json

import dlib
import face_recognition_models
from skimage import data


def main() -> None:
    img = data.astronaut()
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
    face = max(detector(img, 1), key=lambda r: r.area())
    shape = predictor(img, face)
    record = {
        "source": "skimage.data.astronaut() 512x512 RGB",
        "detector": f"dlib {dlib.__version__} (dlib-bin) frontal face detector + shape_predictor_68_face_landmarks "
                    "(face-recognition-models 0.3.0)",
        "face_box": [face.left(), face.top(), face.right(), face.bottom()],
        "landmarks": [[shape.part(i).x, shape.part(i).y] for i in range(68)],
    }
    print("{\n" + ",\n".join(f' "{k}": {json.dumps(v)}' for k, v in record.items()) + "\n}")


if __name__ == "__main__":
    main()
