"""Train the fidelity testbed on CPU, from scratch or from a checkpoint (fine-tuning).

    PYTHONPATH=src python -m trimllama.testbed.train --out src/trimllama/testbed/checkpoint \
        [--steps N] [--resume] [--work-dir /tmp/trimllama_testbed_train]

The shipped checkpoint is that run fine-tuned on a mix of single questions and two-turn
conversations (the second answer is trained, the first is given in the prompt as the chat
template writes it):

    PYTHONPATH=src python -m trimllama.testbed.train --init-from src/trimllama/testbed/checkpoint \
        --out src/trimllama/testbed/checkpoint --seed 1 --conversations 0.35 --steps 1800 --lr 3e-4 \
        --curriculum 0 --aux-start 0.1 --aux-end 0.1 --eval-every 300

(Both ran with the code of commit 85172b8, before the auxiliary loss had its object-centre part: the same
commands now train a slightly different model.)

The training state (model + optimizer + step) is saved every ``--save-every`` steps to
``WORK_DIR/train_state.pt`` (never inside the shipped checkpoint dir) and the log goes to
``WORK_DIR/train_log.txt``. Every evaluation measures the validation questions untrimmed and
with ``Floor``; the best model so far (validation accuracy, per question type) is written to
``--out`` with ``save_pretrained`` (safetensors) together with the processor, plus
``training_summary.json`` (the validation results, the evaluation history and every command
that ran, one per resume).

Data is generated on the fly; the batch at step ``s`` depends only on (seed, s), so a resumed
run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import build, data

QTYPE_WEIGHTS = {"color": 1.0, "shape": 1.0, "count": 1.6, "relation": 1.3}
# Tile-layout weights (data.TILE_LAYOUTS order) during the first --curriculum part of the run:
# mostly single tiles, whose 197 tokens make the object easier to find, then uniform layouts.
SINGLE_TILE_FIRST = (4.0, 1.0, 1.0, 1.0, 1.0)


def balanced_patch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-patch cross-entropy, averaged over object patches and over background patches separately.

    logits: (..., classes); labels: (...) with 0 = background, > 0 an object class, -100 ignored.
    Objects cover about 3% of the patches: a plain mean lets the background dominate, and a first
    run's vision tower then classified object patches' shapes at chance (21%) with a low loss.
    """
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    losses = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="none")
    total = losses.new_zeros(())
    for part in (flat_labels > 0, flat_labels == 0):
        if part.any():
            total = total + losses[part].mean()
    return total


def prompt_text(processor, item) -> str:
    """The prompt of a question, or of a conversation's second turn (first answer given, chat template)."""
    if isinstance(item, data.Conversation):
        from ..harness.evaluate_conversations import second_messages

        return processor.apply_chat_template(second_messages(item, item.first.answer), add_generation_prompt=True)
    return build.PROMPT_TEMPLATE.format(question=item.question)


def target(item) -> data.Question:
    """The question whose answer is trained and scored: a conversation's second one."""
    return item.second if isinstance(item, data.Conversation) else item


def make_batch(processor, items, with_answers: bool):
    """Questions and conversations (one image each) -> processor inputs, left-padded."""
    texts = []
    for item in items:
        t = prompt_text(processor, item)
        if with_answers:
            t = t + " " + target(item).answer + build.EOS
        texts.append(t)
    processor.tokenizer.padding_side = "left"
    enc = processor(images=[[target(item).image] for item in items], text=texts, return_tensors="pt", padding=True)
    return enc


class TrainingBatches(torch.utils.data.Dataset):
    """The training batch of step ``s``: a function of (seed, s) only, so a resumed run sees the batches it
    would have seen, and worker processes (``--workers``) can build them ahead.

    An item is ``(processor inputs, (colour, shape, centre) per-patch labels)``; see ``data.patch_labels``.
    """

    def __init__(self, processor, seed: int, steps: int, batch_size: int, curriculum: float, conversations: float):
        self.processor, self.seed, self.steps, self.batch_size = processor, seed, steps, batch_size
        self.curriculum, self.conversations = curriculum, conversations
        self.qtypes = data.QUESTION_TYPES
        self.weights = tuple(QTYPE_WEIGHTS[t] for t in self.qtypes)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        rng = random.Random(self.seed * 1_000_003 + step)
        early = step < self.curriculum * self.steps
        items = []
        for _ in range(self.batch_size):
            question = data.make_question(rng, rng.choices(self.qtypes, weights=self.weights)[0],
                                          tiles=rng.choices(data.TILE_LAYOUTS, weights=SINGLE_TILE_FIRST if early else None)[0])
            first = data.first_question(rng, question) if self.conversations and rng.random() < self.conversations else None
            items.append(question if first is None else data.Conversation(first=first, second=question))
        labels = tuple(torch.from_numpy(np.stack(part)) for part in zip(*(data.patch_labels(target(item)) for item in items)))
        return dict(make_batch(self.processor, items, with_answers=True)), labels


@torch.no_grad()
def evaluate(model, processor, questions, batch_size: int = 50, shuffle_images: bool = False, method=None):
    """Greedy accuracy per question type (of conversations: of the second turn, the first answer given).

    ``shuffle_images`` rolls the images across the batch (questions only); ``method`` (a selection method,
    e.g. ``Floor()``) trims the model while it answers.
    """
    from contextlib import nullcontext

    from ..handle import trim
    from . import answer_matches

    was_training = model.training
    model.eval()
    per = {}
    for i in range(0, len(questions), batch_size):
        qs = questions[i:i + batch_size]
        if shuffle_images and len(qs) > 1:
            imgs = [q.image for q in qs]
            imgs = imgs[1:] + imgs[:1]
            qs_in = [data.Question(image=im, question=q.question, answer=q.answer, qtype=q.qtype)
                     for im, q in zip(imgs, qs)]
        else:
            qs_in = qs
        enc = make_batch(processor, qs_in, with_answers=False).to(model.device)
        with trim(model, method) if method is not None else nullcontext():
            out = model.generate(**enc, max_new_tokens=3, do_sample=False,
                                 pad_token_id=build.PAD_ID, eos_token_id=build.EOS_ID)
        gen = processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for q, g in zip(qs, gen):
            per.setdefault(q.qtype, []).append(answer_matches(g, target(q).answer))
    res = {k: sum(v) / len(v) for k, v in sorted(per.items())}
    res["overall"] = sum(sum(v) for v in per.values()) / sum(len(v) for v in per.values())
    model.train(was_training)
    return res


def eval_only(args):
    from collections import Counter

    from . import load_testbed

    torch.set_num_threads(args.threads)
    model, processor = load_testbed(checkpoint_dir=args.out)
    qs = data.make_questions(args.eval_n, seed=args.eval_seed)
    t0 = time.time()
    real = evaluate(model, processor, qs)
    t1 = time.time()
    shuf = evaluate(model, processor, qs, shuffle_images=True)
    from ..methods import Floor

    floor = evaluate(model, processor, qs, method=Floor())
    majority = {}
    for t in data.QUESTION_TYPES:
        c = Counter(q.answer for q in qs if q.qtype == t)
        majority[t] = max(c.values()) / sum(c.values())
    res = {"n": len(qs), "seed": args.eval_seed, "real": real, "shuffled_images": shuf, "floor": floor,
           "majority_answer_rate": majority, "seconds_real": round(t1 - t0, 1)}
    print(json.dumps(res, indent=1))
    return res


def fix_scoring_gate(model, value: float) -> None:
    """Set tanh of the first cross-attention layer's two gates to `value` and freeze them."""
    from ..adapters import mllama_facts

    layer = model.model.language_model.layers[mllama_facts.cross_attention_layers(model.config.text_config)[0]]
    for gate in (layer.cross_attn_attn_gate, layer.cross_attn_mlp_gate):
        with torch.no_grad():
            gate.fill_(math.atanh(value))
        gate.requires_grad_(False)


def lr_at(step, total, base, warmup=150, floor=0.05):
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="checkpoint dir to write (save_pretrained)")
    ap.add_argument("--work-dir", default="/tmp/trimllama_testbed_train")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--aux-start", type=float, default=1.0)
    ap.add_argument("--aux-end", type=float, default=0.1)
    ap.add_argument("--curriculum", type=float, default=0.3,
                    help="fraction of the steps that favour single-tile images (SINGLE_TILE_FIRST)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", default=None,
                    help="fine-tune: start from this checkpoint (a new optimizer and auxiliary head) instead of new weights")
    ap.add_argument("--scoring-gate", type=float, default=None,
                    help="fix tanh of the first cross-attention layer's attention and MLP gates at this value and do "
                         "not train them: that layer still selects (its attention is trained as before) but the "
                         "answer must come through the later cross-attention layers")
    ap.add_argument("--conversations", type=float, default=0.0,
                    help="fraction of each batch drawn as two-turn conversations (their second answer is trained)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; above 1, every 200 steps 10 steps with 1 thread and 10 with N are timed "
                         "and the faster kept (on a shared machine 2 threads can be 50x slower)")
    ap.add_argument("--workers", type=int, default=0, help="processes that build batches ahead (0: inline)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (data is generated on the CPU either way)")
    ap.add_argument("--time-limit", type=float, default=0, help="stop (and save) after this many minutes")
    ap.add_argument("--profile", action="store_true", help="print timings of the first steps")
    ap.add_argument("--eval-only", action="store_true",
                    help="evaluate the checkpoint in --out on --eval-n fresh questions (--eval-seed), "
                         "untrimmed, with shuffled images and with Floor, and exit")
    ap.add_argument("--eval-seed", type=int, default=31_337)
    args = ap.parse_args(argv)
    if args.eval_only:
        return eval_only(args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "train_state.pt"
    log_path = work / "train_log.txt"
    out_dir = Path(args.out)

    def log(msg):
        line = time.strftime("%H:%M:%S ") + msg
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    processor = build.make_processor()
    config = build.make_config()
    if args.init_from:
        from . import load_testbed

        model = load_testbed(checkpoint_dir=args.init_from)[0].train()
    else:
        model = build.new_model(config, gate_init=1.0, seed=args.seed)
    if args.scoring_gate is not None:
        fix_scoring_gate(model, args.scoring_gate)
    hid = config.text_config.hidden_size
    n_col, n_shape = 1 + len(data.COLOR_NAMES), 1 + len(data.SHAPES)
    aux_head = torch.nn.Linear(hid, n_col + n_shape + n_col)  # colour, shape, object centre's colour
    model.to(args.device)
    aux_head.to(args.device)
    params = [p for p in model.parameters() if p.requires_grad] + list(aux_head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    step = 0
    best = None
    history = []
    commands = []
    if args.resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        aux_head.load_state_dict(st["aux_head"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        best = st.get("best")
        history = st.get("history", [])
        commands = st.get("commands", [])
        log(f"resumed from {state_path} at step {step}")
    else:
        log(f"new run: {vars(args)}")
        log(f"params: {sum(p.numel() for p in model.parameters())}")

    commands.append({"from_step": step, "command": "python -m trimllama.testbed.train " + shlex.join(
        sys.argv[1:] if argv is None else argv)})
    captured = {}
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda m, i, o: captured.__setitem__("proj", o))

    eval_qs = data.make_questions(args.eval_n, seed=10_000_019)
    eval_conversations = data.make_conversations(args.eval_n, seed=10_000_079) if args.conversations else []
    from ..methods import Floor

    def save_state():
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "aux_head": aux_head.state_dict(), "opt": opt.state_dict(),
                    "step": step, "best": best, "history": history, "args": vars(args), "commands": commands}, tmp)
        os.replace(tmp, state_path)

    def do_eval():
        nonlocal best
        t0 = time.time()
        res = evaluate(model, processor, eval_qs)
        floor = evaluate(model, processor, eval_qs, method=Floor())
        score = (res["overall"], min(v for k, v in res.items() if k != "overall"))
        record = {"step": step, **res, "floor": floor}
        if eval_conversations:
            second = evaluate(model, processor, eval_conversations)
            record["second_turn"] = second
            score = ((res["overall"] + second["overall"]) / 2, score[1])
        history.append(record)
        log(f"eval step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in res.items())
            + " floor: " + " ".join(f"{k}={v:.2f}" for k, v in floor.items())
            + (f" second_turn={record['second_turn']['overall']:.3f}" if eval_conversations else "")
            + f" ({time.time() - t0:.1f}s)")
        if best is None or score >= tuple(best["score"]):
            best = {"step": step, "score": list(score), "res": res}
            build.save_all(model, processor, out_dir)
            with open(out_dir / "training_summary.json", "w") as f:
                summary = {"best_step": step, "validation_accuracy_200": res, "validation_floor_200": floor,
                           "args": vars(args), "commands": commands, "history": history,
                           "note": "validation accuracy during training on 200 questions (seed 10000019), "
                                   "untrimmed and with Floor (later cross-attention layers see no image token)"}
                if eval_conversations:
                    summary["second_turn_accuracy_200"] = record["second_turn"]
                    summary["note"] += "; second turn of 200 conversations (seed 10000079), first answer given"
                json.dump(summary, f, indent=1)
            log(f"saved best model to {out_dir}")

    if args.init_from and step == 0:
        do_eval()  # the starting point: a fine-tune only replaces it when it scores higher
    model.train()
    t_start = time.time()
    t_log = time.time()
    run_loss = run_aux = 0.0
    n_run = 0
    # The 2 cores may be shared with other jobs; 2 OpenMP threads then slow down a lot (each
    # parallel region waits for the descheduled thread). Every 200 steps, time 10 steps with 1
    # thread and 10 with 2, and keep the faster setting (only when --threads is 2 or more).
    cur_threads = args.threads
    probe = {}

    batches = TrainingBatches(processor, args.seed, args.steps, args.batch_size, args.curriculum, args.conversations)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(step, args.steps),
                                         num_workers=args.workers, prefetch_factor=4 if args.workers else None)
    t0 = time.time()
    for enc, (labels_c, labels_s, labels_m) in loader:
        if args.threads > 1:
            phase = step % 200
            if phase == 0:
                probe = {}
                cur_threads = 1
            elif phase == 10:
                cur_threads = args.threads
            elif phase == 20 and len(probe) == 2:
                cur_threads = min(probe, key=lambda k: sum(probe[k]) / len(probe[k]))
                log("threads probe: " + " ".join(f"{k}: {sum(v) / len(v):.2f}s/step" for k, v in probe.items())
                    + f" -> using {cur_threads}")
            torch.set_num_threads(cur_threads)
        enc = {key: value.to(args.device) for key, value in enc.items()}
        labels_c, labels_s, labels_m = labels_c.to(args.device), labels_s.to(args.device), labels_m.to(args.device)
        t1 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        out = model(**enc, use_cache=False, logits_to_keep=3)
        logits = out.logits  # (B, 3, V): predict answer at -3, EOS at -2
        ids = enc["input_ids"]
        tgt = ids[:, -2:]
        loss = F.cross_entropy(logits[:, :2].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))
        proj = captured["proj"]  # (B, 1, tiles, patches, hid)
        aux_logits = aux_head(proj[:, 0])
        aux = (balanced_patch_loss(aux_logits[..., :n_col], labels_c)
               + balanced_patch_loss(aux_logits[..., n_col:n_col + n_shape], labels_s)
               + balanced_patch_loss(aux_logits[..., n_col + n_shape:], labels_m))
        frac = min(1.0, step / (0.5 * args.steps))
        w_aux = args.aux_start + (args.aux_end - args.aux_start) * frac
        total = loss + w_aux * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        t2 = time.time()
        if args.threads > 1 and (step - 1) % 200 < 20 and (step - 1) % 10 >= 2:  # skip warm-up steps
            probe.setdefault(cur_threads, []).append(t2 - t0)
        if args.profile and step <= 5:
            log(f"step {step}: data {t1 - t0:.2f}s, fwd/bwd {t2 - t1:.2f}s, loss {loss.item():.3f} aux {aux.item():.3f}")
        run_loss += loss.item()
        run_aux += aux.item()
        n_run += 1
        if step % 50 == 0:
            log(f"step {step} loss {run_loss / n_run:.4f} aux {run_aux / n_run:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.time() - t_log) / n_run:.2f}s/step elapsed {(time.time() - t_start) / 60:.1f}min")
            run_loss = run_aux = 0.0
            n_run = 0
            t_log = time.time()
        if step % args.eval_every == 0 or step == args.steps:
            do_eval()
        if step % args.save_every == 0 or step == args.steps:
            save_state()
        if args.time_limit and (time.time() - t_start) > args.time_limit * 60:
            log(f"time limit reached at step {step}")
            if step % args.eval_every:
                do_eval()
            save_state()
            break
        t0 = time.time()
    hook.remove()
    log(f"done at step {step}; best {best}")


if __name__ == "__main__":
    main()
