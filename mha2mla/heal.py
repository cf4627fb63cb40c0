"""`mha2mla heal`: fine-tune a converted checkpoint so that it recovers what the conversion lost.

One loop on 🤗 accelerate: CPU, one GPU, or many (DDP / FSDP via ``accelerate launch --config_file
recipes/accelerate/...``); bf16 autocast, gradient accumulation and checkpointing are recipe settings. The loss is
next-token cross-entropy, optionally mixed with distillation from a teacher (e.g. the source model). The latent norm
that the converter made linear is trained in an exactly equivalent, well-scaled form (see :mod:`mha2mla.heal_ops`), so
the loss of step 0 equals the converted model's and early steps stay stable. Runs save resumable checkpoints; the
result is again a stock ``DeepseekV3ForCausalLM`` directory with a ``heal`` record in ``mha2mla.json``.

>>> heal(model="out/smollm2-mla", output="out/smollm2-mla-healed", data="train.txt",
...      recipe="recipes/smollm2-135m-cpu.yaml", max_steps=20)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable

import torch

from mha2mla.data import token_blocks
from mha2mla.errors import Mha2mlaError
from mha2mla.heal_io import finish_output, latest_checkpoint, model_card, read_trainer_state, save_checkpoint
from mha2mla.heal_io import prepare_tokens, write_loss_plot
from mha2mla.heal_ops import block_indices, causal_lm_loss, measure_latent_scales, select_trainable
from mha2mla.heal_ops import to_stock_state_dict, to_training_form
from mha2mla.recipe import RESUMABLE_CHANGES, HealRecipe, load_recipe, lr_factor

__all__ = ["heal"]

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _make_accelerator(rc: HealRecipe):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    if AcceleratorState._shared_state:  # an earlier run in this process (tests, notebooks) fixed other settings
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    # Long barrier timeout: the main process tokenises the data while the others wait.
    kwargs = [InitProcessGroupKwargs(timeout=datetime.timedelta(hours=4))]
    return Accelerator(mixed_precision=rc.mixed_precision, gradient_accumulation_steps=rc.gradient_accumulation_steps,
                       kwargs_handlers=kwargs)


def _load_lm(path: str, what: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise Mha2mlaError(f"{what} {path!r} is not a model directory (no config.json)")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise Mha2mlaError(f"{what} {path!r}: cannot load it as a causal LM ({first[:200]})") from None


def _load_tokenizer(path: str, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise Mha2mlaError(f"{what} {path!r} has no usable tokenizer ({first[:200]})") from None


def _vocab(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _check_teacher(teacher, teacher_path: str, student, tokenizer) -> None:
    if _vocab(teacher) != _vocab(student):
        raise Mha2mlaError(
            f"teacher {teacher_path!r} has a vocabulary of {_vocab(teacher)} logits, the model {_vocab(student)}; "
            "distillation needs the same tokenizer"
        )
    if os.path.isfile(os.path.join(teacher_path, "tokenizer.json")) or os.path.isfile(
        os.path.join(teacher_path, "tokenizer_config.json")
    ):
        theirs = _load_tokenizer(teacher_path, "teacher").get_vocab()
        if theirs != tokenizer.get_vocab():
            n = sum(1 for k, v in theirs.items() if tokenizer.get_vocab().get(k) != v)
            raise Mha2mlaError(f"teacher {teacher_path!r} has a different tokenizer ({n} tokens differ); distillation needs the same one")


def _abs_if_local(spec: str | None) -> str | None:
    return os.path.abspath(spec) if spec is not None and os.path.exists(spec) else spec


def _check_resumable(state: dict, rc: HealRecipe, model_dir: str, processes: int, ckpt: str) -> None:
    old, new = state["recipe"], rc.to_dict()
    diff = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if diff:
        changes = "; ".join(f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in diff)
        raise Mha2mlaError(f"--resume: {ckpt} was made with other settings ({changes}); use the same ones or start over with --force")
    if state["model"] != model_dir:
        raise Mha2mlaError(f"--resume: {ckpt} healed {state['model']!r}, not {model_dir!r}")
    if state["num_processes"] != processes:
        raise Mha2mlaError(f"--resume: {ckpt} ran on {state['num_processes']} processes, this run has {processes}; the data split depends on it")


def _prepare_output(output: str, *, resume: bool, force: bool) -> str | None:
    """Apply the overwrite policy; return the checkpoint to resume from, if any."""
    if resume:
        ckpt = latest_checkpoint(output)
        if ckpt is not None:
            return ckpt
        if os.path.exists(output) and os.listdir(output) and not force:
            raise Mha2mlaError(f"--resume: {output} has no checkpoint (checkpoints/step-N) to resume from; pass --force to start over")
        logger.warning("--resume: no checkpoint in %s; starting at step 0", output)
    elif os.path.exists(output) and not force:
        raise Mha2mlaError(f"{output} exists; pass --force to replace it, or --resume to continue its run")
    return None


def heal(
    *,
    model: str | os.PathLike,
    output: str | os.PathLike,
    data: str | None = None,
    recipe: str | os.PathLike | dict | HealRecipe | None = None,
    teacher: str | os.PathLike | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    **overrides,
) -> dict:
    """Fine-tune the converted checkpoint ``model`` and write the healed one to ``output``.

    Args:
        model: a converted (DeepseekV3) checkpoint directory; any local causal-LM directory works.
        output: the healed checkpoint directory; its ``checkpoints/`` holds resumable state while it runs.
        data: text/JSONL file, directory, or ``hf:DATASET`` (overrides the recipe's ``data``).
        recipe: YAML path, mapping or :class:`HealRecipe`; None for the defaults.
        teacher: a causal-LM directory with the same tokenizer; adds distillation (overrides the recipe's ``teacher``).
        max_steps: optimizer steps (overrides the recipe).
        resume: continue from the newest checkpoint in ``output/checkpoints`` (same losses as an uninterrupted run).
        force: replace an existing ``output``.
        on_step: called as ``on_step(step, info)`` after each optimizer step (and after its checkpoint).
        **overrides: any other recipe key, e.g. ``lr=3e-4``; None values are ignored.

    Returns:
        The ``heal`` record written into ``output/mha2mla.json``.

    Raises:
        Mha2mlaError: bad model, data, recipe, teacher or output.
    """
    t_start = time.time()
    rc = load_recipe(recipe, data=data, teacher=None if teacher is None else os.fspath(teacher), max_steps=max_steps, **overrides)
    if rc.data is None:
        raise Mha2mlaError("no data: pass --data (a .txt/.jsonl file, a directory, or hf:DATASET) or set data: in the recipe")
    rc = dataclasses.replace(rc, data=_abs_if_local(rc.data), teacher=_abs_if_local(rc.teacher))
    model_dir = os.path.abspath(os.fspath(model))
    output = os.path.abspath(os.fspath(output))
    if not os.path.isdir(model_dir):
        raise Mha2mlaError(f"model {os.fspath(model)!r} does not exist or is not a directory")
    if rc.teacher is not None and not os.path.isdir(rc.teacher):
        raise Mha2mlaError(f"teacher {rc.teacher!r} does not exist or is not a directory")
    for what, path in (("model", model_dir), ("teacher", rc.teacher), ("data", rc.data)):
        if path is not None and os.path.isabs(path) and os.path.commonpath([output, path]) == output:
            raise Mha2mlaError(f"--output {output} contains the {what} {path}; give a directory of its own")

    acc = _make_accelerator(rc)
    if not acc.is_main_process:
        logger.setLevel(logging.WARNING)  # one log per run, not one per process
    ckpt = _prepare_output(output, resume=resume, force=force) if acc.is_main_process else None
    ckpt = _broadcast(acc, ckpt)
    if ckpt is None and force and acc.is_main_process and os.path.exists(output):
        shutil.rmtree(output)
    acc.wait_for_everyone()
    created = not os.path.exists(output)
    try:
        return _run(acc, rc, model_dir=model_dir, output=output, ckpt=ckpt, on_step=on_step, t_start=t_start)
    except BaseException:
        if created and acc.is_main_process and latest_checkpoint(output) is None:
            shutil.rmtree(output, ignore_errors=True)  # nothing worth keeping (at most the token cache)
        raise


def _run(acc, rc: HealRecipe, *, model_dir: str, output: str, ckpt: str | None, on_step, t_start: float) -> dict:
    from accelerate.utils import set_seed

    procs, rank = acc.num_processes, acc.process_index
    state = read_trainer_state(ckpt) if ckpt else None
    if state:
        _check_resumable(state, rc, model_dir, procs, ckpt)
    set_seed(rc.seed)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise Mha2mlaError(f"model {model_dir!r} is not a model directory (no config.json)")
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg_json = json.load(f)
    tokenizer = _load_tokenizer(model_dir, "model")
    max_pos = cfg_json.get("max_position_embeddings")
    if max_pos is not None and rc.seq_len > max_pos:
        raise Mha2mlaError(f"seq_len {rc.seq_len} exceeds the model's max_position_embeddings {max_pos}; use a shorter one")
    tokens = prepare_tokens(acc, output, data=rc.data, tokenizer=tokenizer, text_field=rc.text_field,
                            max_docs=rc.max_docs, max_tokens=rc.max_data_tokens)
    blocks = token_blocks(tokens, seq_len=rc.seq_len)
    n_blocks, mbs, ga = blocks.shape[0], rc.micro_batch_size, rc.gradient_accumulation_steps
    rows_per_step = mbs * ga * procs
    logger.info("data %s: %d blocks of %d tokens; %d steps read %.2f epochs", rc.data, n_blocks, rc.seq_len,
                rc.max_steps, rc.max_steps * rows_per_step / n_blocks)
    net = _load_lm(model_dir, "model", _DTYPES[rc.dtype])
    if _vocab(net) < len(tokenizer):
        raise Mha2mlaError(f"model {model_dir!r} has {_vocab(net)} logits but its tokenizer {len(tokenizer)} tokens")
    save_dtype = getattr(torch, str(cfg_json.get("dtype") or cfg_json.get("torch_dtype") or "float32"), torch.float32)
    teacher_net = None
    if rc.teacher is not None:
        t_dtype = torch.bfloat16 if rc.mixed_precision == "bf16" else _DTYPES[rc.dtype]
        teacher_net = _load_lm(rc.teacher, "teacher", t_dtype).to(acc.device).eval().requires_grad_(False)
        _check_teacher(teacher_net, rc.teacher, net, tokenizer)
    net.to(acc.device)

    def batch_at(pos: int) -> torch.Tensor:  # this process's rows of global micro-batch `pos`
        idx = block_indices((pos * procs + rank) * mbs, mbs, n_blocks=n_blocks, seed=rc.seed)
        return blocks[idx].to(device=acc.device, dtype=torch.long)

    def losses_on(module, ids: torch.Tensor):
        with acc.autocast():
            logits = module(input_ids=ids, use_cache=False).logits
            t_logits = None
            if teacher_net is not None:
                with torch.no_grad():
                    t_logits = teacher_net(input_ids=ids, use_cache=False).logits
        return causal_lm_loss(logits, ids, t_logits, alpha=rc.distill_alpha, temperature=rc.distill_temperature)

    if state is None:  # the converted model's loss on the batches of step 0, before any change of form
        net.eval()
        with torch.no_grad():
            ref = torch.stack([losses_on(net, batch_at(m))[0].float() for m in range(ga)]).mean()
        step0_converted = float(acc.reduce(ref, reduction="mean"))
    else:
        step0_converted = state["step0_converted_loss"]

    scales = state["latent_scales"] if state else (measure_latent_scales(net) if rc.latent_rescale else {})
    to_training_form(net, scales)
    if not select_trainable(net, train=rc.train, freeze_latent_norm=rc.freeze_latent_norm):
        raise Mha2mlaError(f"train: {rc.train!r} selects no parameters of {model_dir!r}")
    use_cache = net.config.use_cache
    if rc.gradient_checkpointing:
        if hasattr(net, "activation_checkpointing_enable"):  # the name since transformers 5.x
            net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": rc.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=rc.lr, betas=(rc.adam_beta1, rc.adam_beta2),
                                  eps=rc.adam_eps)
    net, optimizer = acc.prepare(net, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(rc, s))

    hist = {"losses": [], "ce": [], "kd": [], "lr": [], "grad_norm": []}
    step, resumed_from = 0, []
    if state:
        acc.load_state(ckpt)
        scheduler.load_state_dict(state["scheduler"])
        step, hist, resumed_from = state["step"], state["history"], state["resumed_from"] + [state["step"]]
        logger.info("resumed from %s at step %d", ckpt, step)

    def trainer_state() -> dict:
        return {"step": step, "data_position": step * ga, "tokens": step * rows_per_step * rc.seq_len, "history": hist,
                "latent_scales": scales, "step0_converted_loss": step0_converted, "recipe": rc.to_dict(),
                "model": model_dir, "num_processes": procs, "scheduler": scheduler.state_dict(),
                "resumed_from": resumed_from}

    trainable = [p for p in net.parameters() if p.requires_grad]
    t_loop, first_step, saved_at = time.time(), step, (state["step"] if state else None)

    def tokens_per_second(seconds: float) -> float:  # training tokens of this run's steps (not of resumed ones)
        return (step - first_step) * rows_per_step * rc.seq_len / max(seconds, 1e-9)
    try:
        while step < rc.max_steps:
            lr = scheduler.get_last_lr()[0]
            parts, gnorm = [], None
            for m in range(ga):
                ids = batch_at(step * ga + m)
                with acc.accumulate(net):
                    loss, ce, kd = losses_on(net, ids)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if rc.max_grad_norm > 0:
                            gnorm = float(acc.clip_grad_norm_(trainable, rc.max_grad_norm))
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                parts.append(torch.stack([loss.detach().float(), ce.detach().float(), (ce if kd is None else kd).detach().float()]))
            loss_, ce_, kd_ = acc.reduce(torch.stack(parts).mean(0), reduction="mean").tolist()
            step += 1
            hist["losses"].append(loss_)
            hist["ce"].append(ce_)
            if teacher_net is not None:
                hist["kd"].append(kd_)
            hist["lr"].append(lr)
            hist["grad_norm"].append(gnorm)
            if not math.isfinite(loss_):
                raise Mha2mlaError(f"loss became {loss_} at step {step}; lower lr (now {rc.lr}) or check the data")
            if step == 1:
                logger.info("step 0: loss %.6f; the converted model's on the same batch %.6f (|diff| %.2e)", loss_,
                            step0_converted, abs(loss_ - step0_converted))
            if step % rc.log_every == 0 or step == rc.max_steps:
                tok_s = tokens_per_second(time.time() - t_loop)
                kd_txt = f"  kd {kd_:.4f}" if teacher_net is not None else ""
                logger.info("step %d/%d  loss %.4f  ce %.4f%s  lr %.2e  grad-norm %s  %.0f tok/s", step, rc.max_steps,
                            loss_, ce_, kd_txt, lr, "-" if gnorm is None else f"{gnorm:.3f}", tok_s)
            if rc.save_every and (step % rc.save_every == 0 or step == rc.max_steps):
                save_checkpoint(acc, output, step, trainer_state(), keep=rc.keep_checkpoints)
                saved_at = step
            if on_step is not None:
                on_step(step, {"loss": loss_, "ce": ce_, "lr": lr, "grad_norm": gnorm})
    except KeyboardInterrupt:
        where = f"continue from step {saved_at} with --resume" if saved_at else "no checkpoint was saved"
        logger.warning("interrupted at step %d; %s", step, where)
        raise

    loop_s = time.time() - t_loop
    peak_mem = torch.cuda.max_memory_allocated(acc.device) if acc.device.type == "cuda" else None
    full = acc.get_state_dict(net)  # every process takes part (sharded models gather here)
    record = {
        "source": model_dir, "data": rc.data, "teacher": rc.teacher, "steps": step,
        "tokens": step * rows_per_step * rc.seq_len, "num_processes": procs,
        "step0": {"converted_loss": step0_converted, "training_loss": hist["losses"][0] if hist["losses"] else None},
        **hist, "latent_scales": scales, "trainable_parameters": sum(p.numel() for p in trainable),
        "resumed_from": resumed_from, "recipe": rc.to_dict(), "seconds": round(time.time() - t_start, 1),
        "tokens_per_second": round(tokens_per_second(loop_s), 1) if step > first_step else None,
        "peak_device_memory_bytes": peak_mem,
        "versions": _versions(),
    }
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(net)
        if rc.gradient_checkpointing:
            getattr(unwrapped, "activation_checkpointing_disable", unwrapped.gradient_checkpointing_disable)()
        unwrapped.config.use_cache = use_cache
        r = getattr(unwrapped.config, "kv_lora_rank", None) or 0
        stock = _cast(to_stock_state_dict(full, scales, r), save_dtype)
        finish_output(output, lambda tmp: _write_final(tmp, unwrapped, stock, save_dtype, tokenizer, model_dir, record),
                      keep_checkpoints=rc.keep_checkpoints_at_end)
        logger.info("wrote %s", output)
    acc.wait_for_everyone()
    return record


def _broadcast(acc, value):
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _cast(state_dict: dict, dtype: torch.dtype) -> dict:
    seen: dict[int, torch.Tensor] = {}  # keep tied tensors tied
    out = {}
    for k, t in state_dict.items():
        if t.is_floating_point() and t.dtype != dtype:
            key = id(t)
            seen.setdefault(key, t.detach().to("cpu", dtype))
            out[k] = seen[key]
        else:
            out[k] = t.detach().cpu()
    return out


def _versions() -> dict:
    import accelerate
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def _write_final(tmp: str, unwrapped, state_dict: dict, dtype: torch.dtype, tokenizer, model_dir: str, record: dict) -> None:
    unwrapped.save_pretrained(tmp, state_dict=state_dict)
    unwrapped.config.dtype = dtype  # save_pretrained wrote the training dtype; the tensors are in `dtype`
    unwrapped.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    conv = {}
    conv_path = os.path.join(model_dir, "mha2mla.json")
    if os.path.isfile(conv_path):
        with open(conv_path, encoding="utf-8") as f:
            conv = json.load(f)
    if "heal" in conv:
        record = {**record, "previous": conv["heal"]}
    conv["heal"] = record
    with open(os.path.join(tmp, "mha2mla.json"), "w", encoding="utf-8") as f:
        json.dump(conv, f, indent=1)
    card_path = os.path.join(model_dir, "README.md")
    card = None
    if os.path.isfile(card_path):
        with open(card_path, encoding="utf-8") as f:
            card = f.read()
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(card, record))
    write_loss_plot(os.path.join(tmp, "loss.png"), record["losses"], title=f"mha2mla heal: {os.path.basename(model_dir)}",
                    step0_reference=record["step0"]["converted_loss"])
