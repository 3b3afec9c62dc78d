#!/usr/bin/env python3
"""Compare sparsa's training loss and gradients with PyTorch + Hugging Face transformers.

sparsa's training engine can dump one batch to a safetensors file: the input ids, the
next-token targets, the loss components it measured and the gradient of the total loss with
respect to every student parameter (``grad.<hf parameter name>``). This script loads the same
student and teacher with transformers (float32, eager attention, TF32 off), recomputes the loss
exactly as sparsa defines it on that batch,

    total = w_ce * ce + w_kl * kl + w_sq * squarehead

    ce         = mean over positions with target >= 0 of cross-entropy(student logits, target)
    kl         = T^2 * mean over all positions of KL(softmax(teacher/T) || softmax(student/T))
    squarehead = sum over decoder layers of MSE(student, teacher) / mean(teacher^2), on each
                 layer's output residual stream (before the final norm)

backpropagates it, and reports per parameter tensor

    max_abs_err = max |g_sparsa - g_torch|
    rel_max     = max_abs_err / max |g_torch|
    rel_l2      = ||g_sparsa - g_torch|| / ||g_torch||

along with the loss components of both sides. It does not judge the differences unless
``--tolerance`` is given.

Usage:

    python3 scripts/compare_grads_torch.py DUMP.safetensors [--student DIR] [--teacher DIR]
        [--json OUT.json] [--device cuda|cpu] [--tolerance X]

The student and teacher directories default to the paths recorded in the dump's metadata.
Exit status: 0 on success, 1 when the worst rel_max exceeds --tolerance, 2 when a gradient is
missing on either side or a shape differs.
"""

import argparse
import json
import struct
import sys

import numpy as np
import safetensors.numpy
import torch
import torch.nn.functional as F
import transformers

LOSS_NAMES = ("total", "ce", "kl", "squarehead")


def read_metadata(path):
    """The ``__metadata__`` dict of a safetensors file (empty when it has none)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len).decode("utf-8"))
    return header.get("__metadata__") or {}


def load_model(directory, device, trainable):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    model.to(device=device, dtype=torch.float32)
    model.eval()
    model.requires_grad_(trainable)
    return model


def decoder_layers(model):
    """The list of decoder blocks of a causal LM (``model.model.layers`` for Llama-like ones)."""
    base = getattr(model, "model", None)
    if base is not None and hasattr(base, "layers"):
        return base.layers
    return model.get_decoder().layers


def forward_with_features(model, ids):
    """Logits and the output hidden state of every decoder layer (before the final norm)."""
    features = []

    def hook(_module, _inputs, output):
        features.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, features


def compute_losses(student, teacher, ids, targets, weights):
    """The loss terms of sparsa's recipe, as tensors (None for terms not computed)."""
    w_ce, w_kl, w_sq, temperature = weights
    need_teacher = w_kl > 0 or w_sq > 0
    if need_teacher and teacher is None:
        raise SystemExit("error: the dump distils (kl or squarehead weight > 0) but no teacher was given")

    t_logits = t_features = None
    if need_teacher:
        with torch.no_grad():
            t_logits, t_features = forward_with_features(teacher, ids)
    s_logits, s_features = forward_with_features(student, ids)

    vocab = s_logits.shape[-1]
    flat_s = s_logits.reshape(-1, vocab).float()
    n = flat_s.shape[0]

    flat_targets = targets.reshape(-1)
    if (flat_targets >= 0).any():
        ce = F.cross_entropy(flat_s, flat_targets, ignore_index=-1, reduction="mean")
    else:
        ce = flat_s.sum() * 0.0  # sparsa's mean over no rows is 0

    kl = None
    if w_kl > 0:
        log_q = F.log_softmax(flat_s / temperature, dim=-1)
        log_p = F.log_softmax(t_logits.reshape(-1, vocab).float() / temperature, dim=-1)
        kl = temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="sum") / n

    sq = None
    if w_sq > 0:
        if len(s_features) != len(t_features):
            raise SystemExit(
                f"error: student has {len(s_features)} decoder layers, teacher {len(t_features)}"
            )
        sq = flat_s.new_zeros(())
        for s_l, t_l in zip(s_features, t_features):
            t_l = t_l.detach().float()
            den = t_l.pow(2).mean()
            if den.item() == 0.0:
                den = torch.ones_like(den)
            sq = sq + (s_l.float() - t_l).pow(2).mean() / den

    total = flat_s.new_zeros(())
    if w_ce > 0:
        total = total + w_ce * ce
    if kl is not None:
        total = total + w_kl * kl
    if sq is not None:
        total = total + w_sq * sq
    return {"total": total, "ce": ce, "kl": kl, "squarehead": sq}


def rel_diff(a, b):
    if a is None or b is None:
        return None
    scale = abs(b)
    if scale == 0.0:
        return 0.0 if a == b else float("inf")
    return abs(a - b) / scale


def compare_tensor(g_sparsa, g_torch):
    """max_abs_err, rel_max, rel_l2 and the reference's max |g| (all in float64)."""
    a = g_sparsa.astype(np.float64)
    b = g_torch.astype(np.float64)
    diff = a - b
    max_abs_err = float(np.max(np.abs(diff))) if diff.size else 0.0
    ref_max = float(np.max(np.abs(b))) if b.size else 0.0
    err_l2 = float(np.linalg.norm(diff.ravel()))
    ref_l2 = float(np.linalg.norm(b.ravel()))

    def ratio(num, den):
        if den == 0.0:
            return 0.0 if num == 0.0 else float("inf")
        return num / den

    return max_abs_err, ratio(max_abs_err, ref_max), ratio(err_l2, ref_l2), ref_max


def fmt(x, width=11):
    if x is None:
        return "-".rjust(width)
    return f"{x:{width}.3e}"


def main():
    parser = argparse.ArgumentParser(
        description="Compare sparsa's dumped loss and gradients with PyTorch + transformers."
    )
    parser.add_argument("dump", help="safetensors file written by sparsa's gradient dump")
    parser.add_argument("--student", help="student model directory (default: the dump's metadata)")
    parser.add_argument("--teacher", help="teacher model directory (default: the dump's metadata)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tolerance", type=float,
                        help="exit 1 when the worst rel_max exceeds this value")
    args = parser.parse_args()

    metadata = read_metadata(args.dump)
    dump = safetensors.numpy.load_file(args.dump)
    for key in ("ids", "targets", "loss", "weights"):
        if key not in dump:
            raise SystemExit(f"error: {args.dump} has no '{key}' tensor")

    student_dir = args.student or metadata.get("student")
    teacher_dir = args.teacher or metadata.get("teacher") or None
    if not student_dir:
        raise SystemExit("error: no student directory in the dump's metadata; pass --student")

    weights = [float(x) for x in dump["weights"]]
    w_ce, w_kl, w_sq, temperature = weights
    sparsa_loss = dict(zip(LOSS_NAMES, (float(x) for x in dump["loss"])))

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = torch.device(args.device)

    ids = torch.from_numpy(dump["ids"].astype(np.int64)).to(device)
    targets = dump["targets"].astype(np.int64)
    targets[targets < 0] = -1  # sparsa ignores every negative target
    targets = torch.from_numpy(targets).to(device)
    if ids.dim() != 2 or targets.shape != ids.shape:
        raise SystemExit(f"error: ids {tuple(ids.shape)} and targets {tuple(targets.shape)} "
                         "must both be [batch, seq]")

    print(f"dump:      {args.dump}")
    print(f"metadata:  {json.dumps(metadata, sort_keys=True)}")
    print(f"student:   {student_dir}")
    print(f"teacher:   {teacher_dir if (w_kl > 0 or w_sq > 0) else '(not used)'}")
    print(f"batch:     {ids.shape[0]} x {ids.shape[1]} tokens on {device}")
    print(f"weights:   ce={w_ce:g} kl={w_kl:g} squarehead={w_sq:g} T={temperature:g}")

    student = load_model(student_dir, device, trainable=True)
    teacher = None
    if w_kl > 0 or w_sq > 0:
        if not teacher_dir:
            raise SystemExit("error: the dump distils but names no teacher; pass --teacher")
        teacher = load_model(teacher_dir, device, trainable=False)

    vocab = student.get_input_embeddings().weight.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise SystemExit(f"error: token ids outside [0, {vocab})")

    student.zero_grad(set_to_none=True)
    losses = compute_losses(student, teacher, ids, targets, weights)
    if losses["total"].requires_grad:
        losses["total"].backward()
    torch_loss = {k: (None if v is None else float(v.detach().double().item()))
                  for k, v in losses.items()}

    # ---- losses ----
    print()
    print(f"{'loss':<11} {'sparsa':>16} {'torch':>16} {'rel_diff':>11}")
    loss_report = {}
    for name in LOSS_NAMES:
        computed = torch_loss[name] is not None
        s = sparsa_loss[name]
        t = torch_loss[name]
        r = rel_diff(s, t) if computed else None
        loss_report[name] = {"sparsa": s, "torch": t, "rel_diff": r}
        t_text = f"{t:16.9g}" if computed else "(not computed)".rjust(16)
        print(f"{name:<11} {s:16.9g} {t_text} {fmt(r)}")

    # ---- gradients ----
    out_emb = student.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is student.get_input_embeddings().weight
    dump_grads = {k[len("grad."):]: v for k, v in dump.items() if k.startswith("grad.")}
    params = list(student.named_parameters())  # model order; a tied lm_head appears once
    param_names = {name for name, _ in params}

    missing_in_dump = []
    shape_mismatch = []
    rows = []
    for name, p in params:
        if name not in dump_grads:
            missing_in_dump.append(name)
            continue
        g_sparsa = dump_grads[name]
        shape = list(p.shape)
        if list(g_sparsa.shape) != shape:
            shape_mismatch.append({"name": name, "sparsa": list(g_sparsa.shape), "torch": shape})
            continue
        if p.grad is None:
            g_torch = np.zeros(shape, dtype=np.float32)
        else:
            g_torch = p.grad.detach().float().cpu().numpy()
        max_abs_err, rel_max, rel_l2, ref_max = compare_tensor(g_sparsa, g_torch)
        rows.append({"name": name, "shape": shape, "max_abs_err": max_abs_err,
                     "rel_max": rel_max, "rel_l2": rel_l2, "max_abs_grad": ref_max})
    missing_in_torch = [name for name in dump_grads if name not in param_names]

    width = max([len("tensor")] + [len(r["name"]) for r in rows])
    print()
    print(f"{'tensor':<{width}} {'shape':<16} {'max|g|':>11} {'max_abs_err':>11} "
          f"{'rel_max':>11} {'rel_l2':>11}")
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"])
        print(f"{r['name']:<{width}} {shape:<16} {fmt(r['max_abs_grad'])} "
              f"{fmt(r['max_abs_err'])} {fmt(r['rel_max'])} {fmt(r['rel_l2'])}")

    worst_rel_max = worst_tensor = median_rel_max = worst_rel_l2 = worst_l2_tensor = None
    if rows:
        worst = max(rows, key=lambda r: r["rel_max"])
        worst_rel_max, worst_tensor = worst["rel_max"], worst["name"]
        median_rel_max = float(np.median([r["rel_max"] for r in rows]))
        worst_l2 = max(rows, key=lambda r: r["rel_l2"])
        worst_rel_l2, worst_l2_tensor = worst_l2["rel_l2"], worst_l2["name"]

    print()
    print(f"tensors compared: {len(rows)} of {len(params)} student parameters"
          + (" (lm_head tied to embed_tokens)" if tied else ""))
    if rows:
        print(f"worst rel_max:    {worst_rel_max:.3e}  ({worst_tensor})")
        print(f"median rel_max:   {median_rel_max:.3e}")
        print(f"worst rel_l2:     {worst_rel_l2:.3e}  ({worst_l2_tensor})")
    for name in missing_in_dump:
        print(f"MISSING in dump:  grad.{name}")
    for name in missing_in_torch:
        print(f"MISSING in torch: grad.{name} (no such student parameter)")
    for m in shape_mismatch:
        print(f"SHAPE MISMATCH:   {m['name']}: sparsa {m['sparsa']} vs torch {m['torch']}")

    status = 0
    if missing_in_dump or missing_in_torch or shape_mismatch:
        status = 2
    elif args.tolerance is not None and worst_rel_max is not None and worst_rel_max > args.tolerance:
        print(f"FAIL: worst rel_max {worst_rel_max:.3e} > tolerance {args.tolerance:.3e}")
        status = 1

    if args.json:
        result = {
            "dump": args.dump,
            "metadata": metadata,
            "student": student_dir,
            "teacher": teacher_dir,
            "device": str(device),
            "weights": {"ce": w_ce, "kl": w_kl, "squarehead": w_sq, "temperature": temperature},
            "losses": loss_report,
            "tensors": [{k: r[k] for k in ("name", "shape", "max_abs_err", "rel_max", "rel_l2")}
                        for r in rows],
            "worst_rel_max": worst_rel_max,
            "worst_tensor": worst_tensor,
            "median_rel_max": median_rel_max,
            "worst_rel_l2": worst_rel_l2,
            "worst_rel_l2_tensor": worst_l2_tensor,
            "tied_embeddings": tied,
            "missing_in_dump": missing_in_dump,
            "missing_in_torch": missing_in_torch,
            "shape_mismatch": shape_mismatch,
            "tolerance": args.tolerance,
            "exit_code": status,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
