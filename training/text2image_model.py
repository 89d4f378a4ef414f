"""MLflow pyfunc for ``kiln-text2image`` (logged as code: MLflow "models from code").

Input: a DataFrame with a ``prompt`` column and optional ``seed``, ``steps``,
``guidance``, ``negative_prompt`` columns (missing or null -> defaults: seed = row
index, 20 steps, guidance 4.0, no negative prompt).
Output: a DataFrame with ``prompt``, ``seed`` and ``image``: the PNG bytes, base64
encoded (``PIL.Image.open(io.BytesIO(base64.b64decode(s)))`` reads it back).
"""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd

DEFAULTS = {"steps": 20, "guidance": 4.0, "negative_prompt": ""}


def _value(row: pd.Series, col: str, default):
    v = row.get(col, None)
    return default if v is None or (isinstance(v, float) and pd.isna(v)) else v


class Text2Image(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from training.env import offline_defaults
        from training.sampling import load

        offline_defaults()  # never reach for a hub; no library progress bars in serving

        self.pipe = load(context.artifacts["pipeline"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from training.sampling import Request, generate

        if "prompt" not in model_input.columns:
            raise ValueError("input needs a 'prompt' column")
        requests = [
            Request(
                prompt=str(row["prompt"]),
                seed=int(_value(row, "seed", i)),
                steps=int(_value(row, "steps", DEFAULTS["steps"])),
                guidance=float(_value(row, "guidance", DEFAULTS["guidance"])),
                negative=str(_value(row, "negative_prompt", DEFAULTS["negative_prompt"])),
            )
            for i, (_, row) in enumerate(model_input.iterrows())
        ]
        images = generate(self.pipe, requests)
        encoded = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return pd.DataFrame(
            {
                "prompt": [r.prompt for r in requests],
                "seed": [r.seed for r in requests],
                "image": encoded,
            }
        )


mlflow.models.set_model(Text2Image())
