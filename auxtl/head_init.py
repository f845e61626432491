"""A probe-initialised head (LP-FT, Kumar et al. 2022): before fine-tuning, the new linear
head is set to the closed-form ridge classifier of the frozen trunk's pooled features, so
the first gradients that reach the reused layers come from a head that already
separates the classes instead of a random one (which distorts the pretrained features).

Per seed: pooled trunk features of its training images and of the validation images
(inference mode, no augmentation), `auxtl.probes.ridge_probe` chooses the L2 strength on
validation, `auxtl.probes.ridge_fit` fits it on the training images, and the fit is
folded into the head's kernel and bias (the standardisation absorbed). The ridge outputs
are regression scores, not calibrated logits: a scale, chosen on validation from
`LOGIT_SCALES` by cross-entropy, makes them start as confident as validation supports.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from auxtl.data import normalize
from auxtl.finetune_step import in_chunks
from auxtl.errors import InputError
from auxtl.models.trunk import global_avg_pool
from auxtl.probes import ridge_fit, ridge_probe

LOGIT_SCALES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def pooled_features_fn(graphdef):
    """Jitted (params, batch_stats, images, norm) -> globally pooled trunk output, BatchNorm
    in inference mode: what the head of a TransferModel reads."""

    def pooled(params, batch_stats, images, norm):
        model = nnx.merge(graphdef, params, batch_stats)
        return global_avg_pool(model.trunk(normalize(images, norm)))

    return jax.jit(pooled)


def ridge_head(train_x, train_y, val_x, val_y, *, num_classes: int) -> dict[str, Any]:
    """{"kernel" (d, C), "bias" (C,)} of the ridge classifier of features (n, d) -> labels,
    L2 and logit scale chosen on validation; plus "l2", "scale" and "val_accuracy"."""
    train_x, val_x = jnp.asarray(train_x, jnp.float32), jnp.asarray(val_x, jnp.float32)
    chosen = ridge_probe(train_x[None], jnp.asarray(train_y)[None], val_x[None],
                         jnp.asarray(val_y)[None], val_x, jnp.asarray(val_y),
                         num_classes=num_classes)
    l2 = float(np.asarray(chosen.hyperparameter)[0])
    fit = ridge_fit(train_x, jnp.asarray(train_y), num_classes=num_classes, l2=l2)
    finite = jnp.isfinite(fit.scale)
    kernel = jnp.where(finite[:, None], fit.weights / jnp.where(finite, fit.scale, 1.0)[:, None],
                       0.0)
    bias = fit.bias - jnp.where(finite, fit.mean, 0.0) @ kernel
    val_logits = val_x @ kernel + bias
    losses = [float(optax.softmax_cross_entropy_with_integer_labels(
        scale * val_logits, jnp.asarray(val_y)).mean()) for scale in LOGIT_SCALES]
    scale = LOGIT_SCALES[int(np.argmin(losses))]
    return {"kernel": scale * kernel, "bias": scale * bias, "l2": l2, "scale": scale,
            "val_accuracy": float(np.asarray(chosen.val_accuracy)[0])}


def init_heads(pooled, params: list, batch_stats: list, *, images, labels, subsets, val,
               norm, num_classes: int) -> tuple[list, list[dict[str, Any]]]:
    """Each seed's params with its head replaced by `ridge_head` of its training subset
    (`images[subsets[s]]`) and the shared validation set `val` (images, labels); `pooled` is
    `pooled_features_fn(graphdef)`. Returns (new params per seed, what was chosen)."""
    out, chosen = [], []
    for p, b, subset in zip(params, batch_stats, subsets):
        train_x = in_chunks(lambda x: pooled(p, b, x, norm),
                            jnp.asarray(np.asarray(images)[np.asarray(subset)]))
        val_x = in_chunks(lambda x: pooled(p, b, x, norm), jnp.asarray(val[0]))
        head = ridge_head(train_x, np.asarray(labels)[np.asarray(subset)], val_x,
                          np.asarray(val[1]), num_classes=num_classes)
        shapes = jax.tree.map(jnp.shape, p["head"])
        if shapes != {"kernel": head["kernel"].shape, "bias": head["bias"].shape}:
            raise InputError(f"the head's shapes {shapes} do not fit a linear classifier "
                             f"of the pooled features")
        out.append({**p, "head": {"kernel": head["kernel"].astype(p["head"]["kernel"].dtype),
                                  "bias": head["bias"].astype(p["head"]["bias"].dtype)}})
        chosen.append({k: head[k] for k in ("l2", "scale", "val_accuracy")})
    return out, chosen
