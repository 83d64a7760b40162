"""Evaluation: metrics as pure functions, and the runners that apply a trained model to a prepared dataset."""
