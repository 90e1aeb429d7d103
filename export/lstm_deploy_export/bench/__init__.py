"""Bench: `lstm-deploy bench`: timing over a grid against torch.nn.LSTM, and its report."""
