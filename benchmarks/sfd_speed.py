"""Sampling speed of an SFD one-step generator against its teacher's DDIM with guidance, as JSON.

    python benchmarks/sfd_speed.py [--run runs/sfd-seven] [--model digits] [--batch 64] [--repeats 3]

Both generate the same (prompt, seed) batch end to end (text encoding, the UNet, the VAE decode, PIL
images) in the same process, one after the other, after a warm-up; the best of `--repeats` timings
counts. The same is timed up to the clean latent (no VAE decode, which both pay alike). Without
`--run`, the one-step pipeline is built from the teacher's own UNet: the cost of one step depends on
the architecture only, which is the teacher's. Time it alone: other jobs on the
cores distort both numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel choices
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="an sfd run folder (default: a one-step pipeline on the teacher's UNet)")
    parser.add_argument("--model", default="digits", help="the teacher (default: digits)")
    parser.add_argument("--batch", type=int, default=64, help="images per timed batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, help="teacher's DDIM steps (default: the model's, 25 on digits)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pipelines import load_model
    from pipelines.diffusion import OneStepModel
    from pipelines.one_step import OneStepPipeline

    teacher = load_model(args.model)
    if args.run:
        student = load_model(args.run)
        if student.kind != "one-step":
            raise SystemExit(f"{args.run} is a {student.kind} model, not a one-step generator")
    else:
        parts = {k: getattr(teacher, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        student = OneStepModel(OneStepPipeline(**parts, t_init=625), teacher.source)
    steps = args.steps or teacher.sampling["steps"]
    guidance = teacher.sampling["guidance"]
    prompts = ["a red bold three", "a seven", "the number 4 in green", "a handwritten italic nine"]
    seeds = list(range(-(-args.batch // len(prompts))))
    count = len(prompts) * len(seeds)

    def generators():
        return [torch.Generator().manual_seed(s) for _ in prompts for s in seeds]

    def embeddings(model):
        return model.encode([p for p in prompts for _ in seeds])

    timed = {
        "teacher": lambda: teacher.generate(prompts, seeds, steps=steps, guidance=guidance, batch_size=count),
        "one_step": lambda: student.generate(prompts, seeds, batch_size=count),
        "teacher_latents": lambda: teacher.pipe(
            prompt_embeds=embeddings(teacher), negative_prompt_embeds=teacher.encode([""]).expand(count, -1, -1),
            num_inference_steps=steps, guidance_scale=guidance, generator=generators(), output_type="latent"),
        "one_step_latents": lambda: student.pipe(
            prompt_embeds=embeddings(student), generator=generators(), output_type="latent"),
    }  # fmt: skip
    with torch.inference_mode():
        seconds = {name: best_time(fn, args.repeats) for name, fn in timed.items()}

    def entry(name: str, evaluations: int) -> dict:
        return {"unet_evaluations_per_image": evaluations, "seconds": round(seconds[name], 4),
                "images_per_s": round(count / seconds[name], 2)}  # fmt: skip

    result = {
        "model": args.model, "one_step_model": args.run or "teacher's UNet as a one-step pipeline (same cost)",
        "images_per_batch": count, "repeats": args.repeats, "threads": args.threads,
        "teacher": {"steps": steps, "guidance": guidance, **entry("teacher", 2 * steps)},
        "one_step": entry("one_step", 1),
        "speedup": round(seconds["teacher"] / seconds["one_step"], 1),
        "up_to_the_latent": {
            "teacher": entry("teacher_latents", 2 * steps), "one_step": entry("one_step_latents", 1),
            "speedup": round(seconds["teacher_latents"] / seconds["one_step_latents"], 1),
        },
        "note": "end to end (text encoder, UNet, VAE decode, PIL), same batch, same process, best of repeats; "
        "up_to_the_latent: the same without the VAE decode",
    }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
