"""Every request, response and streamed event of the HTTP API (API.md) as Pydantic models.

    common.py   limits, bases, sampling, attention selection, the sampling-knob rule, errors
    native.py   /v1/generate (and its NDJSON events), /v1/tokenize, /v1/detokenize
    openai.py   /v1/completions, /v1/chat/completions, /v1/models
    analyze.py  /v1/analyze

Torch-free on purpose: these modules import only pydantic, the standard library and the torch-free
`model.limits`, so the Python client can import them without torch, LitServe or FastAPI.

Requests validate everything a schema can know (types, ranges, list sizes). What needs the model
(prompt tokens vs max_context, layer / head indices vs the model's shape, token ids vs the
vocabulary) is `model.limits.Limits.check`, answered with 400. `model_construct` skips validators,
including the logprob floor (-inf → LOGPROB_FLOOR).
"""

from server.schemas.analyze import *  # noqa: F403
from server.schemas.common import *  # noqa: F403
from server.schemas.native import *  # noqa: F403
from server.schemas.openai import *  # noqa: F403
