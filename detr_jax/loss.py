"""DETR's set loss: Hungarian matching, then class, L1 and GIoU losses, for every decoder layer.

Exactly the reference formulas:
- matching cost `C = cost_bbox * L1 + cost_class * (-softmax(logits)[label])
  + cost_giou * (-GIoU)`, solved exactly per image and per decoder layer (no gradient);
- classification: cross-entropy over all queries, unmatched queries target "no object"
  (index K), weighted mean with weight `eos_coef` for no-object and 1 otherwise;
- boxes: L1 (summed over coordinates) and 1 - GIoU over matched pairs, each divided by
  `num_boxes` = number of valid targets in the global batch, clamped to >= 1;
- auxiliary losses: the same for decoder layers 0..L-2, each with its own matching, summed;
- masks (when the outputs hold `pred_masks`, `config.model.masks`): sigmoid focal loss (alpha
  0.25, gamma 2; mean over pixels) and DICE loss (+1 smoothing) of each matched (target,
  query) pair of the last decoder layer, summed and divided by `num_boxes`. Only the matched
  queries' masks are gathered, into the static target slots ([B, T, ...], never all Q
  queries); predictions are upsampled bilinearly (align_corners False) to the target masks'
  size when it differs (`segmentation.resize_bilinear`), compared directly when equal.

With the sigmoid classifier (`model.classifier="sigmoid"`, Conditional DETR's, as in its
original release and in `transformers`) the logits have K columns and no "no object" one:
- matching class cost `cost_class * (pos - neg)[label]` with p = sigmoid(logit),
  pos = alpha (1 - p)^gamma (-log(p + 1e-8)), neg = (1 - alpha) p^gamma (-log(1 - p + 1e-8));
- classification: the sigmoid focal loss of every (query, class) logit against the one-hot
  of the query's matched label (all zeros when unmatched), summed and divided by `num_boxes`;
- `cardinality_error` counts the queries whose highest class probability exceeds 0.5.

Group DETR (`groups` G > 1): the model's G x Q queries are G groups of Q (group-major). Each
group is matched one-to-one to the targets on its own: the groups are folded into the batch
([B, G x Q] -> [B x G, Q], targets repeated), so all B x G x L problems still go to one
batched, shard-local `matcher.assign`, and `num_boxes` becomes G times the target count: each
loss is the mean over groups of the per-group loss (the paper's and the Group DETR
implementations' normalization). G = 1 is exactly the plain loss.

Targets are static-shape: `labels [B, T] int32`, `boxes [B, T, 4]` normalized cxcywh,
`valid [B, T] bool`, and for masks `masks [B, T, Hm, Wm]` uint8 (1 inside the object). All
layers are matched in one batched `matcher.assign` call. Inside a `jax.jit` over a global
batch, sums over the batch are global sums, so `num_boxes` is the global count without any
explicit collective. (The cross-entropy is one weighted mean over
the global batch; the reference averages per-GPU means, which is the same on one device.)
"""

import functools

import jax
import jax.numpy as jnp

from detr_jax import box_ops, matcher, segmentation

FOCAL_ALPHA = 0.25  # the reference's sigmoid_focal_loss defaults
FOCAL_GAMMA = 2.0


def _power(x, gamma):
  """x ** gamma, as repeated multiplication when gamma is a whole number (like torch)."""
  if float(gamma).is_integer():
    return jax.lax.integer_pow(x, int(gamma))
  return x**gamma


def focal_class_cost(pred_logits, alpha, gamma):
  """Sigmoid focal matching cost of each class: [..., Q, K] logits -> [..., Q, K]."""
  prob = jax.nn.sigmoid(pred_logits.astype(jnp.float32))
  neg = (1 - alpha) * _power(prob, gamma) * -jnp.log(1 - prob + 1e-8)
  pos = alpha * _power(1 - prob, gamma) * -jnp.log(prob + 1e-8)
  return pos - neg


def match_cost(
  pred_logits,
  pred_boxes,
  labels,
  boxes,
  cost_class,
  cost_bbox,
  cost_giou,
  classifier,
  focal_alpha,
  focal_gamma,
):
  """Matching cost of every (target, query) pair.

  Args:
    pred_logits: [..., Q, K+1] (softmax classifier) or [..., Q, K] (sigmoid);
      pred_boxes: [..., Q, 4] cxcywh.
    labels: [..., T] int32; boxes: [..., T, 4] cxcywh.
    classifier: "softmax" (-prob[label]) or "sigmoid" (`focal_class_cost` with focal_alpha
      and focal_gamma).

  Returns:
    [..., T, Q] float32 cost.
  """
  if classifier == "sigmoid":
    per_class = focal_class_cost(pred_logits, focal_alpha, focal_gamma)
  else:
    per_class = -jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
  safe_labels = jnp.clip(labels, 0, pred_logits.shape[-1] - 1)
  c_class = jnp.take_along_axis(per_class, safe_labels[..., None, :], axis=-1)  # [..., Q, T]
  c_class = jnp.swapaxes(c_class, -1, -2)
  c_bbox = jnp.abs(boxes[..., :, None, :] - pred_boxes[..., None, :, :]).sum(-1)
  c_giou = -box_ops.generalized_box_iou(
    box_ops.cxcywh_to_xyxy(boxes), box_ops.cxcywh_to_xyxy(pred_boxes)
  )
  return cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou


def sigmoid_focal_loss(logits, targets, alpha, gamma):
  """Elementwise sigmoid focal loss (RetinaNet's): logits, targets in {0, 1} -> same shape.

  alpha_t (1 - p_t)^gamma BCE(logits, targets), alpha_t = alpha for positives, 1 - alpha for
  negatives.
  """
  prob = jax.nn.sigmoid(logits)
  bce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = prob * targets + (1 - prob) * (1 - targets)
  alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
  return alpha_t * _power(1 - p_t, gamma) * bce


def _fold_groups(outputs, targets, groups):
  """Group DETR: [B, G x Q] predictions -> [B x G, Q] (targets repeated) so that each group
  is matched and scored like a batch element of its own."""
  fold = lambda x: x.reshape(x.shape[0] * groups, x.shape[1] // groups, *x.shape[2:])
  layers = [outputs] + list(outputs["aux_outputs"])
  folded = [{k: fold(o[k]) for k in ("pred_logits", "pred_boxes")} for o in layers]
  outputs = {**folded[0], "aux_outputs": folded[1:]}
  targets = {
    k: jnp.repeat(jnp.asarray(targets[k]), groups, axis=0) for k in ("labels", "boxes", "valid")
  }
  return outputs, targets


def mask_losses(pred_masks, masks, idx, matched, num_boxes):
  """The reference's focal and DICE mask losses of the matched pairs.

  Args:
    pred_masks: [B, Q, h, w] mask logits. masks: [B, T, Hm, Wm] targets in {0, 1}.
    idx: [B, T] int, the query matched to each target slot (any value where not `matched`).
    matched: [B, T] bool. num_boxes: the normalizer (valid targets, >= 1).

  Returns:
    (loss_mask, loss_dice) float32 scalars: per matched pair the focal loss averaged over the
    Hm x Wm pixels and 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1), summed over pairs and
    divided by `num_boxes`.
  """
  src = jnp.take_along_axis(pred_masks, idx[:, :, None, None], axis=1).astype(jnp.float32)
  src = segmentation.resize_bilinear(src, masks.shape[-2:])  # [B, T, Hm, Wm]
  tgt = masks.astype(jnp.float32)
  prob = jax.nn.sigmoid(src)
  focal = sigmoid_focal_loss(src, tgt, FOCAL_ALPHA, FOCAL_GAMMA).mean((-2, -1))  # [B, T]
  numerator = 2.0 * (prob * tgt).sum((-2, -1))
  denominator = prob.sum((-2, -1)) + tgt.sum((-2, -1))
  dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)  # [B, T]
  loss_mask = jnp.where(matched, focal, 0.0).sum() / num_boxes
  loss_dice = jnp.where(matched, dice, 0.0).sum() / num_boxes
  return loss_mask, loss_dice


def _check_target_masks(targets):
  if "masks" not in targets:
    raise ValueError(
      "The model predicts masks (config.model.masks=True) but the batch has no `masks` "
      f"[B, T, Hm, Wm]; batch fields: {sorted(targets)}"
    )
  shape, expected = targets["masks"].shape, targets["labels"].shape
  if len(shape) != 4 or tuple(shape[:2]) != tuple(expected):
    raise ValueError(
      f"batch `masks` has shape {tuple(shape)}; expected [B, T, Hm, Wm] with [B, T] = "
      f"{tuple(expected)} (the shape of `labels`)"
    )


def _stack_layers(outputs, aux_loss):
  """Decoder layer outputs stacked: logits [L, B, Q, K+1], boxes [L, B, Q, 4] (last = final)."""
  layers = (list(outputs["aux_outputs"]) if aux_loss else []) + [outputs]
  logits = jnp.stack([o["pred_logits"] for o in layers]).astype(jnp.float32)
  boxes = jnp.stack([o["pred_boxes"] for o in layers]).astype(jnp.float32)
  return logits, boxes


def set_loss(
  outputs,
  targets,
  *,
  num_classes,
  class_weight,
  bbox_weight,
  giou_weight,
  eos_coef,
  mask_weight,
  dice_weight,
  aux_loss,
  cost_class,
  cost_bbox,
  cost_giou,
  matcher_method,
  classifier,
  focal_alpha,
  focal_gamma,
  groups,
  mesh=None,
):
  """Total DETR loss and its logged terms.

  Args:
    outputs: the model's dict (`pred_logits` [B, G x Q, C], `pred_boxes` [B, G x Q, 4],
      `aux_outputs` list of such dicts; with masks `pred_masks` [B, Q, h, w]); C = K+1
      (softmax classifier) or K (sigmoid).
    targets: dict with `labels` [B, T] int32, `boxes` [B, T, 4] cxcywh, `valid` [B, T] bool;
      with `pred_masks` also `masks` [B, T, Hm, Wm] (any resolution; see `mask_losses`).
    num_classes: K; with the softmax classifier, index K of the logits is "no object".
    mask_weight, dice_weight: weights of `loss_mask` and `loss_dice` (used with masks only).
    classifier: "softmax" (cross-entropy, eos_coef) or "sigmoid" (focal_alpha, focal_gamma).
    groups: G, the query groups of Group DETR (1: plain DETR; masks need G = 1).
    mesh: when given, matching runs shard-local over the mesh's "data" axis.

  Returns:
    (loss scalar, metrics dict): `loss_ce`, `loss_bbox`, `loss_giou` for the last layer,
    with masks `loss_mask` and `loss_dice` (last layer only, as the reference),
    `loss_ce_{i}` etc. for auxiliary layer i, `class_error` (percent, last layer, matched
    queries) and `cardinality_error` (mean |#non-no-object predictions - #targets|, also
    per auxiliary layer as `cardinality_error_{i}`), as the reference logs them.
  """
  if "pred_masks" in outputs:
    _check_target_masks(targets)
  if groups > 1:
    outputs, targets = _fold_groups(outputs, targets, groups)
  logits, pboxes = _stack_layers(outputs, aux_loss)
  num_layers, _, num_queries, _ = logits.shape
  labels = targets["labels"].astype(jnp.int32)
  tboxes = targets["boxes"].astype(jnp.float32)
  valid = targets["valid"].astype(bool)

  # Matching of all layers in one batched call, batch dim leading for shard-local solving.
  cost = match_cost(
    logits,
    pboxes,
    labels[None],
    tboxes[None],
    cost_class,
    cost_bbox,
    cost_giou,
    classifier,
    focal_alpha,
    focal_gamma,
  )  # [L, B, T, Q]
  cost = jax.lax.stop_gradient(jnp.swapaxes(cost, 0, 1))  # [B, L, T, Q]
  valid_bl = jnp.broadcast_to(valid[:, None], cost.shape[:-1])
  idx = matcher.assign(cost, valid_bl, matcher_method, mesh=mesh)  # [B, L, T]
  idx = jnp.swapaxes(idx, 0, 1)  # [L, B, T]
  matched = valid[None] & (idx >= 0)
  safe_idx = jnp.maximum(idx, 0)

  num_boxes = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)

  # Boxes: gather each target's matched prediction.
  src = jnp.take_along_axis(pboxes, safe_idx[..., None], axis=2)  # [L, B, T, 4]
  tgt = jnp.broadcast_to(tboxes[None], src.shape)
  m = matched.astype(jnp.float32)
  loss_bbox = (jnp.abs(src - tgt).sum(-1) * m).sum((1, 2)) / num_boxes  # [L]
  giou = box_ops.elementwise_generalized_box_iou(
    box_ops.cxcywh_to_xyxy(src), box_ops.cxcywh_to_xyxy(tgt)
  )
  loss_giou = ((1.0 - giou) * m).sum((1, 2)) / num_boxes  # [L]

  # Classes: each query's target class, K where unmatched.
  onehot = (safe_idx[..., None] == jnp.arange(num_queries)) & matched[..., None]  # [L,B,T,Q]
  is_matched = onehot.any(axis=2)  # [L, B, Q]
  matched_label = (onehot * labels[None, :, :, None]).sum(axis=2)
  target_classes = jnp.where(is_matched, matched_label, num_classes)
  if classifier == "sigmoid":
    target_onehot = (target_classes[..., None] == jnp.arange(num_classes)).astype(jnp.float32)
    focal = sigmoid_focal_loss(logits, target_onehot, focal_alpha, focal_gamma)
    loss_ce = focal.sum((1, 2, 3)) / num_boxes  # [L]
  else:
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, target_classes[..., None], axis=-1)[..., 0]  # [L, B, Q]
    weight = jnp.where(target_classes == num_classes, eos_coef, 1.0)
    loss_ce = (weight * nll).sum((1, 2)) / weight.sum((1, 2))  # [L]

  per_layer = class_weight * loss_ce + bbox_weight * loss_bbox + giou_weight * loss_giou
  loss = per_layer.sum()

  metrics = {}
  if "pred_masks" in outputs:
    loss_mask, loss_dice = mask_losses(
      outputs["pred_masks"], targets["masks"], safe_idx[-1], matched[-1], num_boxes
    )
    loss = loss + mask_weight * loss_mask + dice_weight * loss_dice
    metrics["loss_mask"], metrics["loss_dice"] = loss_mask, loss_dice

  metrics["loss"] = loss
  for i in range(num_layers):
    suffix = "" if i == num_layers - 1 else f"_{i}"
    metrics["loss_ce" + suffix] = loss_ce[i]
    metrics["loss_bbox" + suffix] = loss_bbox[i]
    metrics["loss_giou" + suffix] = loss_giou[i]

  # Logged only (last layer).
  last_logits = logits[-1]
  pred_for_target = jnp.take_along_axis(last_logits, safe_idx[-1][..., None], axis=1)
  correct = (pred_for_target.argmax(-1) == labels) & matched[-1]
  num_matched = matched[-1].sum()
  accuracy = jnp.where(num_matched > 0, 100.0 * correct.sum() / jnp.maximum(num_matched, 1), 0.0)
  metrics["class_error"] = 100.0 - accuracy
  if classifier == "sigmoid":
    card_pred = (jax.nn.sigmoid(logits).max(-1) > 0.5).sum(-1)  # [L, B]
  else:
    card_pred = (logits.argmax(-1) != num_classes).sum(-1)  # [L, B]
  card_err = jnp.abs(card_pred - valid.sum(-1)).astype(jnp.float32).mean(-1)  # [L]
  for i in range(num_layers):
    metrics["cardinality_error" + ("" if i == num_layers - 1 else f"_{i}")] = card_err[i]
  return loss, metrics


def make_loss_fn(loss_config, model, mesh=None):
  """`set_loss` with the fields of `config.loss` bound (the one place they are read) and the
  model's classes, classifier and query groups (`model`: the `models.DETR` it trains)."""
  c = loss_config
  if not 0 <= c.focal_alpha <= 1 or c.focal_gamma < 0:
    raise ValueError(
      f"config.loss.focal_alpha={c.focal_alpha} must be in [0, 1] and "
      f"config.loss.focal_gamma={c.focal_gamma} >= 0"
    )
  return functools.partial(
    set_loss,
    num_classes=model.num_classes,
    class_weight=c.class_weight,
    bbox_weight=c.bbox_weight,
    giou_weight=c.giou_weight,
    eos_coef=c.eos_coef,
    mask_weight=c.mask_weight,
    dice_weight=c.dice_weight,
    aux_loss=c.aux_loss,
    cost_class=c.cost_class,
    cost_bbox=c.cost_bbox,
    cost_giou=c.cost_giou,
    matcher_method=c.matcher,
    classifier=model.classifier,
    focal_alpha=c.focal_alpha,
    focal_gamma=c.focal_gamma,
    groups=model.groups,
    mesh=mesh,
  )
