"""The BentoML `generate` endpoint's signature, derived from JobParams.

BentoML reads an endpoint's inputs from its Python signature (its schema, /docs.json and
`SyncHTTPClient` all follow from that). Writing the job parameters out by hand there would
declare them twice; `job_params_signature` builds the signature from `JobParams` instead, so
a parameter added to the schema appears on BentoML's surface with the same type, range,
default and description.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from lipsync_runner.params import JobParams

INPUT_DESCRIPTIONS = {
    "video": "The video with the face (checked by content: mp4, mov, mkv, webm, avi); or give video_url.",
    "audio": "The new speech (checked by content: wav, mp3, m4a, aac, ogg, or a video's sound track); or give "
             "audio_url.",
}


def job_params_signature(context_type: Any, defaults: Mapping[str, Any] | None = None) -> Callable:
    """Decorator: `func(self, video, audio, wait, <each JobParams field>, ctx)` as func's signature.

    The function itself takes `**params`; `defaults` overrides schema defaults (the deployment's
    LIP_SYNC_BBOX_SHIFT for bbox_shift).
    """
    def decorate(func: Callable) -> Callable:
        P = inspect.Parameter
        params = [P("self", P.POSITIONAL_OR_KEYWORD)]
        # optional (an input may come by URL instead); typed Path, not Optional[Path]: BentoML's file
        # handling cannot see a Path inside a Union, and a default is not validated
        for name, description in INPUT_DESCRIPTIONS.items():
            params.append(P(name, P.KEYWORD_ONLY, default=None,
                            annotation=Annotated[Path, Field(description=description)]))
        params.append(P("wait", P.KEYWORD_ONLY, default=False,
                        annotation=Annotated[bool, Field(description="Block until the job has finished.")]))
        for name, info in JobParams.model_fields.items():
            default = (defaults or {}).get(name, info.default)
            annotation = Annotated[(info.annotation, *info.metadata, Field(description=info.description))]
            params.append(P(name, P.KEYWORD_ONLY, default=default, annotation=annotation))
        params.append(P("ctx", P.KEYWORD_ONLY, default=None, annotation=context_type))
        func.__signature__ = inspect.Signature(params, return_annotation=dict[str, Any])
        return func

    return decorate
