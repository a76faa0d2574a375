"""What the demo cascade's conditionings say about a picture: probes of its EfficientNet latents (issue 13).

Stage C generates EfficientNet latents and Stage B draws from them, so an attribute the latents do not
keep is lost before Stage B (whose only other source is the pooled text). Each probe is trained on the
latents of rendered training-split images and scored on held-out combinations, per attribute:

- ``linear``: ridge regression to one-hot labels (a linear read-out);
- ``mlp``: one hidden layer of 256 GELUs, softmax cross-entropy, AdamW (a nonlinear read-out); its
  training-set accuracy is reported too (1.0 with a low held-out score: the attribute is memorised,
  not encoded).

The same probes on the CLIP text encoder's pooled embedding of each caption (what Stage B attends to)
show what the text could tell Stage B.

    python -m cascade_jax.demo.evaluate.probe                  # the shipped demo weights
    python -m cascade_jax.demo.evaluate.probe --weights DIR --train 2048 --test 512
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

from cascade_jax.demo.evaluate import load_pipeline, write_report
from cascade_jax.demo import shapes
from cascade_jax.demo.evaluate import RESULTS_DIR

DEFAULT_OUT = RESULTS_DIR / "demo_probe.json"
ATTRIBUTES = shapes.ATTRIBUTES  # colour, shape, position, background: the fields of a shapes.Combo
RIDGE = 0.1
MLP_WIDTH, MLP_STEPS, MLP_LR = 256, 3000, 1e-3


def linear_probe(x_train, y_train, x_test, classes: int) -> np.ndarray:
    """Held-out predictions of a ridge regression to one-hot labels (with a bias)."""
    a = np.c_[x_train, np.ones(len(x_train))]
    w = np.linalg.solve(a.T @ a + RIDGE * np.eye(a.shape[1]), a.T @ np.eye(classes)[y_train])
    return (np.c_[x_test, np.ones(len(x_test))] @ w).argmax(1)


def mlp_probe(x_train, y_train, x_test, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, training) predictions of a one-hidden-layer MLP trained full-batch."""
    import jax
    import jax.numpy as jnp
    import optax

    k1, k2 = jax.random.split(jax.random.key(seed))
    d = x_train.shape[1]
    params = {"w1": jax.random.normal(k1, (d, MLP_WIDTH)) / np.sqrt(d), "b1": jnp.zeros(MLP_WIDTH),
              "w2": jax.random.normal(k2, (MLP_WIDTH, classes)) / np.sqrt(MLP_WIDTH), "b2": jnp.zeros(classes)}

    def forward(p, x):
        return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    opt = optax.adamw(MLP_LR, weight_decay=1e-2)
    x, y = jnp.asarray(x_train), jnp.asarray(y_train)

    def step(carry, _):
        p, s = carry
        grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(p, x), y).mean())(p)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=MLP_STEPS))(params)
    return np.asarray(forward(params, jnp.asarray(x_test)).argmax(1)), np.asarray(forward(params, x).argmax(1))


def probe_all(x_train, combos_train, x_test, combos_test) -> dict:
    """attribute -> {linear, mlp, mlp_train} accuracy."""
    out = {}
    for k, name in enumerate(ATTRIBUTES):
        labels = sorted({c[k] for c in combos_train} | {c[k] for c in combos_test})
        y_train = np.array([labels.index(c[k]) for c in combos_train])
        y_test = np.array([labels.index(c[k]) for c in combos_test])
        test_pred, train_pred = mlp_probe(x_train, y_train, x_test, len(labels))
        out[name] = {"linear": float(np.mean(linear_probe(x_train, y_train, x_test, len(labels)) == y_test)),
                     "mlp": float(np.mean(test_pred == y_test)), "mlp_train": float(np.mean(train_pred == y_train)),
                     "chance": 1 / len(labels)}
    return out


def features(pipe, n: int, seed: int, split: str, size: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(EfficientNet latents, pooled text embeddings, combos) of ``n`` rendered images of ``split``."""
    images, captions, combos = shapes.generate(n, seed, size, split)
    latents, pooled = [], []
    for i in range(0, n, 64):
        batch = images[i:i + 64]
        latents.append(np.asarray(pipe.encode_effnet(batch, size, size)).reshape(len(batch), -1))
        text = pipe.text(captions[i:i + 64])
        pooled.append(np.asarray(text.stage_b()["clip"], np.float32)[:, 0])
    return np.concatenate(latents), np.concatenate(pooled), combos


def markdown(report: dict) -> str:
    lines = [f"# Demo cascade, what its conditionings keep: {report['weights']}", "",
             f"{report['date']}; probes trained on {report['train']} training-split images, scored on "
             f"{report['test']} held-out ones ({report['size']}x{report['size']}); held-out accuracy, linear / MLP "
             "(MLP on its training images).", "",
             "| features | " + " | ".join(ATTRIBUTES) + " |", "|---" * (len(ATTRIBUTES) + 1) + "|"]
    for name, probes in report["probes"].items():
        cells = [f"{p['linear']:.3f} / {p['mlp']:.3f} ({p['mlp_train']:.2f})" for p in probes.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    chance = [f"{p['chance']:.3f}" for p in next(iter(report["probes"].values())).values()]
    lines.append("| chance | " + " | ".join(chance) + " |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="demo", help="'demo' (default) or a weights folder")
    p.add_argument("--train", type=int, default=2048, help="training-split images for the probes (default 2048)")
    p.add_argument("--test", type=int, default=512, help="held-out images to score (default 512)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT}); .md beside it")
    args = p.parse_args(argv)
    if args.train < 2 or args.test < 1:
        print(f"error: --train must be >= 2 and --test >= 1, got {args.train} and {args.test}", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.weights)
    if pipe is None:
        return 2
    start = time.perf_counter()
    lat_train, text_train, combos_train = features(pipe, args.train, 1, "train", args.size)
    lat_test, text_test, combos_test = features(pipe, args.test, 2, "heldout", args.size)
    report = {"weights": args.weights, "train": args.train, "test": args.test, "size": args.size,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "probes": {"EfficientNet latents": probe_all(lat_train, combos_train, lat_test, combos_test),
                         "pooled text embedding": probe_all(text_train, combos_train, text_test, combos_test)}}
    report["wall_s"] = round(time.perf_counter() - start, 1)
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
