"""A streaming voice-activity detector: audio features -> unidirectional torch.nn.LSTM -> Linear ->
sigmoid, a speech probability per frame, trained for a few seconds on synthetic audio, exported
as a streamable bundle and served in chunks: the server carries the LSTM's (h, c) from one chunk
to the next, so chunked results equal one run over the whole stream.

The audio: FEATURES log-energy bands of noise; a speech segment raises the low bands for its
duration, but only after a short onset click in the top band marks its start, and its end is
marked by a click too. Frames between the clicks are speech: telling them needs memory.

The model is plain PyTorch (torch.nn.LSTM); export converts it (lstm_deploy.convert).

    python -m examples.detector train --out detector.safetensors        # a few seconds
    lstm-deploy export --module examples.detector:make_model --weights detector.safetensors \\
        --example features=1x50x20 --output-names speech --streamable \\
        --artifacts torchscript,onnx,scan --out detector-bundle
    lstm-deploy validate detector-bundle --quick
    lstm-deploy serve detector-bundle
    python -m examples.detector stream --chunk 25                        # tritonclient, gRPC
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

FEATURES = 20


class Detector(nn.Module):
    def __init__(self, features: int = FEATURES, hidden: int = 32):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, features: Tensor) -> Tensor:
        """features: float32 [batch, frames, FEATURES] -> speech probability [batch, frames, 1]."""
        y, _ = self.lstm(features)
        return torch.sigmoid(self.head(y))


def make_model() -> Detector:
    """The factory that `lstm-deploy export --module examples.detector:make_model` calls."""
    return Detector()


def audio(size: int, frames: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Synthetic features [size, frames, FEATURES] and speech labels [size, frames, 1]."""
    x = 0.5 * torch.randn(size, frames, FEATURES, generator=generator)
    labels = torch.zeros(size, frames, 1)
    for i in range(size):
        t = int(torch.randint(0, frames // 3, (1,), generator=generator))
        while t < frames - 4:
            n = int(torch.randint(4, frames // 2, (1,), generator=generator))
            end = min(t + n, frames - 1)
            x[i, t, -1] += 3.0  # the onset click
            x[i, t + 1 : end, : FEATURES // 2] += 1.0  # speech raises the low bands
            x[i, end, -1] += 3.0  # the end click
            labels[i, t + 1 : end] = 1.0
            t = end + int(torch.randint(3, frames // 2, (1,), generator=generator))
    return x, labels


def train(model: Detector, seconds: float = 5.0, seed: int = 0) -> float:
    """Adam on fresh synthetic audio for `seconds`; returns the frame accuracy on held-out audio."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        x, labels = audio(32, 60, g)
        loss = nn.functional.binary_cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, labels = audio(128, 200, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        predicted = model(x) > 0.5
    return float((predicted == (labels > 0.5)).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.detector", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train for a few seconds and save the weights")
    t.add_argument("--out", type=Path, default=Path("detector.safetensors"))
    t.add_argument("--seconds", type=float, default=5.0)
    s = sub.add_parser("stream", help="stream synthetic audio to a running server in chunks")
    s.add_argument("--url", default="localhost:8001", help="the server's gRPC address")
    s.add_argument("--model", default="lstm_onnx")
    s.add_argument("--frames", type=int, default=200)
    s.add_argument("--chunk", type=int, default=25, help="frames per request")
    args = p.parse_args(argv)
    if args.command == "train":
        from safetensors.torch import save_model

        model = make_model()
        accuracy = train(model, args.seconds)
        save_model(model, str(args.out))
        print(f"trained {args.seconds:g} s: frame accuracy {accuracy:.1%}; wrote {args.out}")
        return 0
    import numpy as np
    import tritonclient.grpc as grpc

    x, labels = audio(1, args.frames, torch.Generator().manual_seed(7))
    frames = x.numpy()
    probabilities = []
    with grpc.InferenceServerClient(args.url) as client:
        for start in range(0, args.frames, args.chunk):
            chunk = np.ascontiguousarray(frames[:, start : start + args.chunk])
            item = grpc.InferInput("features", list(chunk.shape), "FP32")
            item.set_data_from_numpy(chunk)
            result = client.infer(
                args.model, [item], sequence_id=1, sequence_start=start == 0,
                sequence_end=start + args.chunk >= args.frames,
            )  # fmt: skip
            probabilities.append(result.as_numpy("speech")[0, :, 0])
    speech = np.concatenate(probabilities) > 0.5
    truth = labels[0, :, 0].numpy() > 0.5
    print("speech: " + "".join("#" if s else "." for s in speech))
    print("truth:  " + "".join("#" if s else "." for s in truth))
    accuracy = (speech == truth).mean()
    print(f"{args.frames} frames in chunks of {args.chunk}: accuracy {accuracy:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
