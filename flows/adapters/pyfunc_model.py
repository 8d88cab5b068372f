"""MLflow "model from code" for SecureMark classifiers.

Logged models hold ``weights.safetensors`` (tensors only) and this file; loading one
with ``mlflow.pyfunc.load_model`` runs this code, which rebuilds the network from the
weights file's metadata. Nothing is unpickled. ``predict`` takes float images
[N, 1, 28, 28] (or [N, 784]) in [0, 1] and returns class indices.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from securemark.model import predict
from securemark.weights import load_weights


class SecureMarkClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model = load_weights(context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32)).reshape(-1, 1, 28, 28)
        return predict(self.model, x).numpy()


mlflow.models.set_model(SecureMarkClassifier())
