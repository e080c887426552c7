"""Predicted segmentation masks: saved by the sweep, drawn by the report.

For the segmentation task the sweep keeps, for the first seed's HP runs,
the argmax predictions of the best-validation (early-stopped) model on the
first :data:`NUM_IMAGES` images of the test split (VOC's ``val.txt``):
``RUN/masks/hp_tau<τ>_seed<s>.npz`` (``pred`` (k, H, W) uint8) and, once,
``RUN/masks/inputs.npz`` (``image`` (k, H, W, 3) uint8 as the model saw it,
un-standardised; ``label`` (k, H, W) uint8, 255 = not labelled). The report
(:func:`figure`) draws them at τ = 0, τ* and the largest τ.
"""

from __future__ import annotations

import os

import numpy as np

NUM_IMAGES = 4


def _dir(run) -> str:
    return os.path.join(run.path, "masks")


def pred_path(run, variant: str, tau: int, seed: int) -> str:
    return os.path.join(_dir(run), f"{variant}_tau{tau}_seed{seed}.npz")


def save_inputs(run, x, y, mean, std) -> None:
    """The displayed images (standardised x → uint8) and their labels, once."""
    path = os.path.join(_dir(run), "inputs.npz")
    if os.path.exists(path):
        return
    os.makedirs(_dir(run), exist_ok=True)
    img = np.asarray(x)
    if img.dtype != np.uint8:
        raw = img if mean is None else img * np.asarray(std) + np.asarray(mean)
        img = np.clip(raw * 255 + 0.5, 0, 255)
    np.savez(path, image=img.astype(np.uint8), label=np.asarray(y).astype(np.uint8))


def save_pred(run, variant: str, tau: int, seed: int, pred) -> None:
    os.makedirs(_dir(run), exist_ok=True)
    np.savez(pred_path(run, variant, tau, seed), pred=np.asarray(pred).astype(np.uint8))


def figure(run, taus_star: tuple[int, int | None, int], seed: int):
    """A matplotlib figure (or None without saved masks): one row per image,
    columns image, ground truth and the prediction after HPτ-FT for τ = 0,
    τ* and the largest τ (each once), in VOC's palette; white = 255."""
    from hpft_jax import voc  # noqa: PLC0415
    from hpft_jax.outputs import plt  # noqa: PLC0415

    inputs = os.path.join(_dir(run), "inputs.npz")
    taus = []
    for t in taus_star:
        if t is not None and t not in taus and os.path.exists(pred_path(run, "hp", t, seed)):
            taus.append(t)
    if not os.path.exists(inputs) or not taus:
        return None
    with np.load(inputs, allow_pickle=False) as f:
        image, label = f["image"], f["label"]
    preds = []
    for t in taus:
        with np.load(pred_path(run, "hp", t, seed), allow_pickle=False) as f:
            preds.append(f["pred"])
    pal = voc.palette()
    pal[255] = 255
    names = {taus_star[0]: "τ = 0", taus_star[2]: f"τ = {taus_star[2]} (largest)"}
    if taus_star[1] is not None:
        names[taus_star[1]] = f"τ* = {taus_star[1]}"
    cols = ["image", "ground truth"] + [f"HP-FT, {names.get(t, t)}" for t in taus]
    k = len(image)
    fig, axes = plt().subplots(k, len(cols), figsize=(1.9 * len(cols), 1.9 * k + 0.4),
                               squeeze=False)
    for i in range(k):
        panels = [image[i], pal[label[i]]] + [pal[p[i]] for p in preds]
        for j, (ax, im) in enumerate(zip(axes[i], panels)):
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=7)
    fig.suptitle(f"Predicted masks, first {k} test (VOC val) images, seed {seed}, "
                 "best-validation model; VOC palette, white = not labelled", fontsize=7)
    return fig
