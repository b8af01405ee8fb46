"""The comparison plots (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.compute import Results  # noqa: E402

COLORS = {"mean": "tab:blue", "sum": "tab:orange", "token_mean": "tab:green", "seq_mean": "tab:red"}


def _color(mode: str) -> str:
    return COLORS.get(mode, "tab:gray")


def _suffix(res: Results) -> str:
    return f" ({', '.join(res.caveats)})" if res.caveats else ""


def _xaxis(ax, res: Results) -> None:
    ax.set_xticks(range(len(res.labels)), res.labels, rotation=30)
    ax.set_xlabel(f"{res.split} {res.options.bucket_by} bucket (tokens)")


def loss_by_bucket(res: Results, path: Path) -> None:
    final = res.bucket_losses[res.bucket_losses.step == res.final_step]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, column, title in zip(axes, ["token_loss", "example_loss"], ["token-weighted", "example-weighted"]):
        for mode, part in final.groupby("reduce_loss"):
            ax.plot(part.bucket, part[column], "o-", color=_color(mode), label=mode)
        ax.set_title(f"{title} validation loss")
        _xaxis(ax, res)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("NLL (nats / token)")
    axes[0].legend(title="reduce_loss")
    fig.suptitle(f"Validation loss by length bucket at step {res.final_step}{_suffix(res)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_difference(res: Results, path: Path) -> None:
    final = res.paired_diff[res.paired_diff.step == res.final_step]
    modes = sorted(final.reduce_loss.unique())
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        part = final[final.reduce_loss == mode]
        err = np.vstack([part["diff"] - part.ci_low, part.ci_high - part["diff"]])
        ax.errorbar(part.bucket, part["diff"], yerr=err, fmt="o", capsize=4, color=_color(mode),
                    label=f"mean difference, {int(res.options.confidence * 100)}% CI over seeds and examples")
        ax.axhline(0, color="black", lw=1)
        seeds = int(part.seeds.max())
        ax.set_title(f"{mode} − {res.options.reference} ({seeds} seed{'s' if seeds > 1 else ', within-seed only'})")
        _xaxis(ax, res)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("paired Δ per-example loss (nats / token)")
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(f"Paired difference against {res.options.reference} at step {res.final_step}{_suffix(res)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smooth(values: np.ndarray, span: float = 0.1) -> np.ndarray:
    """Exponential moving average over about `span` of the steps, started without bias (as in
    TensorBoard), so the first steps are not pulled towards zero."""
    alpha = 1 - 1 / max(2.0, span * len(values))
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = alpha * avg + (1 - alpha) * v
        out[i] = avg / (1 - alpha ** (i + 1))
    return out


def training_curves(res: Results, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ["-", "--", ":", "-."]
    seeds = sorted(res.curves.seed.unique())
    for (mode, seed), part in res.curves.sort_values("step").groupby(["reduce_loss", "seed"]):
        style = styles[seeds.index(seed) % 4]
        ax.plot(part.step, part.value, style, color=_color(mode), lw=0.6, alpha=0.25)
        ax.plot(part.step, smooth(part.value.to_numpy()), style, color=_color(mode), lw=1.5, label=f"{mode}, seed {seed}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss: token-mean NLL of the step (nats)")
    ax.set_title(f"Training loss, smoothed (raw per-step values faint){_suffix(res)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bucket_panels(n: int, sharex: bool = False):
    """A figure of one panel per bucket, three to a row (spare panels switched off): the figure,
    the axes grid and the (bucket, axes) pairs."""
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), sharex=sharex, squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes, list(enumerate(axes.flat))[:n]


def loss_over_steps(res: Results, path: Path) -> None:
    fig, axes, panels = bucket_panels(len(res.labels), sharex=True)
    for b, ax in panels:
        part = res.bucket_losses[res.bucket_losses.bucket == b]
        for mode, p in part.groupby("reduce_loss"):
            ax.plot(p.step, p.token_loss, "o-", color=_color(mode), label=mode, ms=3)
        ax.set_title(f"{res.options.bucket_by} {res.labels[b]}")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    for ax in axes[:, 0]:
        ax.set_ylabel("val NLL (nats / token)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Token-weighted validation loss per bucket over training{_suffix(res)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gradient_share(res: Results, path: Path) -> None:
    share = res.grad_share
    modes = sorted(share.reduce_loss.unique())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        part = share[share.reduce_loss == mode]
        ax.bar(part.bucket + (i - (len(modes) - 1) / 2) * width, 100 * part.share, width, color=_color(mode), label=mode)
    tokens = share.drop_duplicates("bucket")
    ax.hlines(100 * tokens.token_share, tokens.bucket - 0.45, tokens.bucket + 0.45, colors="black", lw=1.5,
              label="share of training target tokens")
    _xaxis(ax, res)
    ax.set_xlabel(f"training-example {res.options.bucket_by} bucket (tokens)")
    ax.set_ylabel("share of total gradient weight (%)")
    ax.set_title(f"Where each reduction puts its gradient weight during training{_suffix(res)}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(title="reduce_loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {
    "val_loss_by_bucket.png": loss_by_bucket,
    "paired_difference.png": paired_difference,
    "train_loss.png": training_curves,
    "val_loss_by_bucket_over_steps.png": loss_over_steps,
    "gradient_weight_share.png": gradient_share,
}


CAPTIONS = {
    "val_loss_by_bucket.png": "Validation loss of each reduction per length bucket at the final step, token-weighted "
                              "(left) and example-weighted (right).",
    "paired_difference.png": "Paired difference of per-example validation loss against the reference, per length "
                             "bucket at the final step, with its interval; below zero the mode does better.",
    "train_loss.png": "Training loss (token-mean NLL of each step) over optimizer steps: smoothed lines over the "
                      "faint raw per-step values.",
    "val_loss_by_bucket_over_steps.png": "Token-weighted validation loss of each length bucket at every "
                                         "evaluation during training.",
    "gradient_weight_share.png": "Share of the total gradient weight that training examples of each length bucket "
                                 "received over the run; the black line is the bucket's share of training target "
                                 "tokens (where a reduction that weighs every token the same would sit).",
}


def draw_all(res: Results, out: Path) -> list[str]:
    drawn = []
    for name, draw in PLOTS.items():
        if name == "gradient_weight_share.png" and res.grad_share.empty:
            continue
        draw(res, out / name)
        drawn.append(name)
    return drawn
