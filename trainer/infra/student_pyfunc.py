"""The MLflow pyfunc model of a trained student, logged as code (MLflow's models-from-code).

MLflow copies this file into the model and runs it to load it, so nothing is unpickled: the
weights stay a state dict read with ``weights_only=True`` (``trainer.evaluate.load_student``)
from the model's ``checkpoint`` artifact (``student.pt`` + ``config.yaml``). The last line,
``set_model``, is how MLflow finds the model in a code file; nothing else imports this module.

``predict`` takes precomputed features as a dict of arrays and returns each branch's embeddings:
``video_feats`` (videos, frames, model.video_dim) with ``video_mask`` (videos, frames), and
``query_feats`` (queries, words, model.query_dim) with ``query_mask`` (queries, words); masks are
1 for real rows. Out come ``video_<branch>`` (videos, frames, hidden) and ``query_<branch>``
(queries, hidden); a branch scores a video by its best real frame's cosine with the query.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

from trainer.infra.mlflow_model import CHECKPOINT



class StudentModel(PythonModel):
    def load_context(self, context) -> None:
        from trainer.evaluate import load_student

        self.student, self.cfg = load_student(Path(context.artifacts[CHECKPOINT]))

    def predict(self, context, model_input, params=None):   # no type hints: MLflow reads them
        import numpy as np
        import torch

        out = {}
        with torch.no_grad():
            for kind, encode in (("video", self.student.encode_videos),
                                 ("query", self.student.encode_queries)):
                feats = torch.as_tensor(np.asarray(model_input[f"{kind}_feats"], np.float32))
                mask = torch.as_tensor(np.asarray(model_input[f"{kind}_mask"], np.float32))
                for branch, emb in encode(feats, mask).items():
                    out[f"{kind}_{branch}"] = emb[:len(feats)].float().numpy()
        return out


mlflow.models.set_model(StudentModel())
