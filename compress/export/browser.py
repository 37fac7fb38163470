"""Lay the evaluated ONNX artifacts out as one model directory for transformers.js (the browser).

    compress run profile=browser          # -> runs/<name>/browser/
        config.json  generation_config.json  tokenizer.json  tokenizer_config.json
        onnx/model.onnx            + model.onnx_data              (fp32;  dtype: "fp32")
        onnx/model_quantized.onnx  + model_quantized.onnx_data    (int8;  dtype: "q8", the WASM default)
        onnx/model_q4.onnx         + model_q4.onnx_data           (int4;  dtype: "q4")

    // in the app
    const generator = await pipeline("text-generation", "my-model", { dtype: "q4", device: "webgpu" });

The files are the evaluated artifacts' own graphs, re-saved only to give each its weights file the
`<name>.onnx_data` name transformers.js fetches; nothing is re-quantized, so the report's numbers
hold for what the app loads.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import artifacts
from ..stage import stage
from .onnx import SIDE_FILES, resave

# compress's quant name -> transformers.js file name for that dtype.
FILE_OF_QUANT = {"fp32": "model.onnx", "int8": "model_quantized.onnx", "int4": "model_q4.onnx"}
DTYPE_OF_QUANT = {"fp32": "fp32", "int8": "q8", "int4": "q4"}


@stage("layout", reads=("export.layout",), format="transformers.js")
def run(cfg, src, out) -> artifacts.Artifact:
    """`src`: the ONNX artifacts of one model (fp32 first) -> one transformers.js directory."""
    arts = list(src)
    first = Path(arts[0].path)
    with artifacts.writing(out) as (tmp, meta):
        (tmp / "onnx").mkdir()
        for art in arts:
            resave(art.file, tmp / "onnx" / FILE_OF_QUANT[art.meta["quant"]])
        for name in SIDE_FILES:
            if (first / name).is_file():
                (tmp / name).write_bytes((first / name).read_bytes())
        config = json.loads((tmp / "config.json").read_text())
        # Weights sit beside each graph in <file>_data; transformers.js fetches it when told so.
        config["transformers.js_config"] = {"use_external_data_format": True,
                                            "dtype": DTYPE_OF_QUANT[arts[-1].meta["quant"]]}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        meta["metrics"] = {"files": {DTYPE_OF_QUANT[a.meta["quant"]]: f"onnx/{FILE_OF_QUANT[a.meta['quant']]}"
                                     for a in arts},
                           "from": [a.name for a in arts]}
    return artifacts.load(out)
