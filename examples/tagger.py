"""A part-of-speech-style tagger: token ids -> Embedding -> 2-layer bidirectional LSTM -> a tag per
token, trained for a few seconds on a synthetic language, then exported, validated and served.

The language: words 0..VOCAB-1; an unambiguous word (id < AMBIGUOUS) has the tag id % TAGS; an
ambiguous word takes the tag after the previous word's, and the first word of a sentence takes
the tag before the next word's. A tag thus depends on both neighbours: what a bidirectional LSTM
is for. Sentences have different lengths, batched with `lengths`.

The LSTM is lstm_deploy.LSTM called with `lengths=`: the result of pack_padded_sequence +
torch.nn.LSTM (validate checks it against exactly that), in a form that scripts and exports.

    python -m examples.tagger train --out tagger.safetensors            # a few seconds
    lstm-deploy export --module examples.tagger:make_model --weights tagger.safetensors \\
        --example tokens=1x16:int64:0:100 --example lengths=1:int64 \\
        --output-names logits --artifacts torchscript,onnx,scan --out tagger-bundle
    lstm-deploy validate tagger-bundle --quick
    lstm-deploy serve tagger-bundle
    python -m examples.tagger query "12 57 3 88 41"                      # tritonclient, HTTP
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from lstm_deploy import LSTM

VOCAB, TAGS, AMBIGUOUS = 100, 7, 60  # ids >= AMBIGUOUS are ambiguous words


class Tagger(nn.Module):
    def __init__(self, vocab: int = VOCAB, tags: int = TAGS, dim: int = 32, hidden: int = 48):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, tags)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """tokens: int64 [batch, sequence], lengths: int64 [batch] -> logits [batch, seq, TAGS]."""
        x = self.embed(tokens)
        y, _ = self.lstm(x, lengths=lengths)
        return self.head(y)


def make_model() -> Tagger:
    """The factory that `lstm-deploy export --module examples.tagger:make_model` calls."""
    return Tagger()


def tags_of(tokens: Tensor) -> Tensor:
    """The synthetic language's tags of one sentence (1-D token ids)."""
    tags = torch.where(tokens < AMBIGUOUS, tokens % TAGS, torch.full_like(tokens, -1))
    for t in range(1, len(tokens)):  # ambiguous: the tag after the previous word's
        if tags[t] < 0:
            tags[t] = (tags[t - 1] + 1) % TAGS
    if tags[0] < 0:  # an ambiguous first word: the tag before the next word's
        tags[0] = (tags[1] - 1) % TAGS if len(tokens) > 1 else 0
    return tags


def batch(size: int, generator: torch.Generator, max_len: int = 20) -> tuple[Tensor, ...]:
    """Padded sentences (tokens, lengths, tags); tags are -100 (ignored) at padded steps."""
    lengths = torch.randint(2, max_len + 1, (size,), generator=generator)
    tokens = torch.zeros(size, max_len, dtype=torch.int64)
    tags = torch.full((size, max_len), -100, dtype=torch.int64)
    for i, n in enumerate(lengths.tolist()):
        sentence = torch.randint(0, VOCAB, (n,), generator=generator)
        tokens[i, :n], tags[i, :n] = sentence, tags_of(sentence)
    return tokens, lengths, tags


def train(model: Tagger, seconds: float = 5.0, seed: int = 0) -> float:
    """Adam on fresh synthetic batches for `seconds`; returns the accuracy on a held-out batch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    model.train()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tokens, lengths, tags = batch(32, g)
        loss = loss_fn(model(tokens, lengths).reshape(-1, TAGS), tags.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    tokens, lengths, tags = batch(256, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        predicted = model(tokens, lengths).argmax(-1)
    valid = tags >= 0
    return float((predicted[valid] == tags[valid]).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.tagger", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train for a few seconds and save the weights")
    t.add_argument("--out", type=Path, default=Path("tagger.safetensors"))
    t.add_argument("--seconds", type=float, default=5.0)
    q = sub.add_parser("query", help="tag a sentence on a running server (tritonclient)")
    q.add_argument("sentence", help='token ids separated by spaces, e.g. "12 57 3 88 41"')
    q.add_argument("--url", default="localhost:8000")
    q.add_argument("--model", default="lstm_onnx")
    args = p.parse_args(argv)
    if args.command == "train":
        from safetensors.torch import save_model

        model = make_model()
        accuracy = train(model, args.seconds)
        save_model(model, str(args.out))
        print(f"trained {args.seconds:g} s: held-out tag accuracy {accuracy:.1%}; wrote {args.out}")
        return 0
    import numpy as np
    import tritonclient.http as http

    tokens = np.array([[int(w) for w in args.sentence.split()]], dtype=np.int64)
    inputs = [http.InferInput("tokens", list(tokens.shape), "INT64"),
              http.InferInput("lengths", [1], "INT64")]  # fmt: skip
    inputs[0].set_data_from_numpy(tokens)
    inputs[1].set_data_from_numpy(np.array([tokens.shape[1]], dtype=np.int64))
    with http.InferenceServerClient(args.url) as client:
        logits = client.infer(args.model, inputs).as_numpy("logits")
    print(" ".join(f"{w}/{tag}" for w, tag in zip(tokens[0], logits[0].argmax(-1))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
