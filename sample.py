"""Text sampled from a run that train.py wrote (its run folder: training/runs.py).

    python sample.py --out runs --method lora --prompt "def " --tokens 200 --seed 0
    python sample.py --out runs --method base --temperature 0.8 --top-k 20

The same run, method, prompt, seed and options give the same text. Sampling runs torch on one
thread: a one-token step is too small to share between threads, and on busy cores a second thread
slows it down many times over.
"""
from __future__ import annotations

import argparse
import sys

import torch

from checks import check_int, check_number
from training.flags import Parser, checked, folder, text_flag
from training.runs import MissingRun, decode, encode, load_model, make_command

# Each character is one forward pass of the model on up to block_size tokens, one thread: 2.4 ms
# of CPU for the default model on a loaded 2-core VM (docs/tiny_gpt.md has the command), so
# 100,000 characters are minutes of work and 10^9 (a typo away) would be weeks. A longer text is
# several calls with other seeds.
MAX_TOKENS = 100_000
# logits / temperature must stay finite in float32 (logits of tens over 1e-300 are inf, and the
# softmax of inf is NaN); 1e-3 is already greedy to the float32 precision of the softmax.
# Above 1e3 the draw is uniform to float32 precision.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e3

# -------------------------------------------------------------------------------------- sampling


def sample_text(model, vocab: str, prompt: str, tokens: int, seed: int, temperature: float = 1.0,
                top_k: int | None = None) -> str:
    """`prompt` and `tokens` characters drawn after it in eval mode, from a seeded generator."""
    device = next(model.parameters()).device
    ids = encode(prompt, vocab)[0][None].to(device)  # (1, T)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device).manual_seed(seed)
    out = model.generate(ids, tokens, temperature, top_k, generator=generator)  # (1, T + tokens)
    model.train(was_training)
    return decode(out[0].tolist(), vocab)


def print_samples(models: dict, vocab: str, out: str, prompt: str = "def ", tokens: int = 80,
                  seed: int = 0) -> None:
    """One short sample from each named model: what train.py prints after its table."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token steps: see the docstring
    print(f"\nsamples: {tokens} characters after {prompt!r}, seed {seed} (as `python sample.py "
          f"--out {out} --method <method> --tokens {tokens}` prints them)")
    for method, model in models.items():
        print(f"--- {method}\n{sample_text(model, vocab, prompt, tokens, seed)}")
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------- command line

def fail(message, status: int):
    print(f"sample.py: {message}", file=sys.stderr)
    raise SystemExit(status)


def build_parser() -> Parser:
    p = Parser(prog="sample.py", description="Sample text from a run that train.py wrote.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=folder, default="runs", help="the run folder train.py wrote")
    p.add_argument("--method", default="lora", choices=("base", "full", "lora", "qlora", "dora",
                                                        "vera"), help="whose weights sample")
    p.add_argument("--prompt", type=text_flag, default="def ", help="the text to continue")
    p.add_argument("--tokens", type=checked(check_int, low=1, high=MAX_TOKENS), default=200,
                   help=f"characters to draw (at most {MAX_TOKENS:,}: see MAX_TOKENS)")
    p.add_argument("--seed", type=checked(check_int, low=0, high=2**64 - 1), default=0,
                   help="seed of the sampling generator")
    p.add_argument("--temperature", type=checked(check_number, float, low=MIN_TEMPERATURE,
                                                 high=MAX_TEMPERATURE), default=1.0,
                   help="divides the logits; below 1 is more conservative")
    p.add_argument("--top-k", type=checked(check_int, low=1), default=None,
                   help="draw only from the k likeliest characters (None: from all)")
    return p


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)  # one-token steps: see the docstring
    try:
        model, vocab = load_model(args.out, args.method)
    except MissingRun as error:
        fail(error, 2)
    except (ValueError, TypeError, OSError) as error:  # CorruptFile, a bad adapter or file
        fail(f"{error}; make it again with {make_command(args.out, args.method)}", 1)
    if args.top_k is not None and args.top_k > len(vocab):
        fail(f"argument --top-k: must be at most the vocabulary's {len(vocab)}", 2)
    text = sample_text(model, vocab, args.prompt, args.tokens, args.seed, args.temperature,
                       args.top_k)
    print(text)
    return text


if __name__ == "__main__":
    main()
