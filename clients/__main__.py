"""`python -m clients` (or `attnserve-client`): talk to an attnserve server from the shell.

    attnserve-client generate "two plus three equals"                  # tokens as they stream
    attnserve-client generate "two plus three equals" --attention      # + where it looked
    attnserve-client generate "one plus one equals" --temperature 0.8 --top-p 0.9 --seed 1 --json
    attnserve-client analyze "two plus three equals five"                # logprobs + the logit lens
    attnserve-client analyze --prompt "two plus three equals" --completion " five"
    attnserve-client tokenize "two plus three equals"
    attnserve-client detokenize 373 274
    attnserve-client models | health | metrics

The server is --url (or ATTNSERVE_URL, default http://127.0.0.1:8000); the key --api-key (or
ATTNSERVE_API_KEY). Exit status: 0 ok, 1 the server refused or failed, 2 invalid arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clients.client import Client
from clients.errors import AttnserveError, ValidationError
from clients.heatmap import token_heatmap, visible
from clients.options import API_KEY_ENV, URL_ENV, Retry, Timeout
from clients.results import Analysis, Completion, to_json
from server.schemas import AttentionRequest, TokenEvent


def index_or_mean(value: str) -> int | str:
    if value == "mean":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an index (negative counts from the end) or 'mean', "
                                         f"got {value!r}") from None


def _connection_options(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--url", default=default, help=f"server address [env {URL_ENV}; default "
                       "http://127.0.0.1:8000]")
    group.add_argument("--api-key", default=default, help=f"API key [env {API_KEY_ENV}]")
    group.add_argument("--timeout", type=float, default=default, metavar="S",
                       help=f"read timeout in seconds [default {Timeout().read:g}]")
    group.add_argument("--retries", type=int, default=default, metavar="N",
                       help=f"retries on connection errors and 429/503 [default {Retry().max_retries}]")


def build_parser() -> argparse.ArgumentParser:
    intro, examples, *_ = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="attnserve-client", description=intro, epilog="examples:\n" + examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_options(parser, None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = {}
    for name, text in [("generate", "generate text, printing tokens as they stream"),
                       ("analyze", "what the model makes of a text: each token's logprob and the logit lens"),
                       ("tokenize", "show a text's tokens"), ("detokenize", "the text of token ids"),
                       ("models", "the served model"), ("health", "exit 0 when the server is ready"),
                       ("metrics", "the Prometheus metrics")]:
        sub[name] = commands.add_parser(name, help=text, description=text)
        _connection_options(sub[name], argparse.SUPPRESS)  # also accepted after the command
        if name in ("generate", "analyze", "tokenize", "models"):
            sub[name].add_argument("--json", action="store_true", help="print the raw JSON (events)")

    gen = sub["generate"]
    gen.add_argument("prompt", help='the text to continue ("-" reads standard input)')
    gen.add_argument("-n", "--max-tokens", type=int, help="most tokens to generate [server default 64]")
    sampling = gen.add_argument_group("sampling (none given: greedy; two truncation knobs: an error)")
    sampling.add_argument("-t", "--temperature", type=float, help="0: greedy; alone: plain random sampling")
    sampling.add_argument("--top-k", type=int, help="top-k sampling")
    sampling.add_argument("--top-p", type=float, help="nucleus sampling")
    sampling.add_argument("--min-p", type=float, help="min-p sampling")
    sampling.add_argument("--typical-p", type=float, help="locally typical sampling")
    sampling.add_argument("--seed", type=int, help="same seed, same output")
    sampling.add_argument("--repetition-penalty", type=float)
    sampling.add_argument("--frequency-penalty", type=float)
    sampling.add_argument("--presence-penalty", type=float)
    gen.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", default=None, help="generate past end-of-sequence")
    gen.add_argument("--logprobs", type=int, metavar="N", help="print each token's logprob and N alternatives")
    att = gen.add_argument_group("attention")
    att.add_argument("--attention", action="store_true", help="print a heatmap of one generated token's "
                     "attention over its context")
    att.add_argument("--layer", type=index_or_mean, default=-1, help="layer index or 'mean' [default -1: the last]")
    att.add_argument("--head", type=index_or_mean, default="mean", help="head index or 'mean' [default mean]")
    att.add_argument("--token", type=int, help="which generated token [default: the last with text]")
    att.add_argument("--width", type=int, default=20, help="bar width in characters [default 20]")

    ana = sub["analyze"]
    ana.add_argument("text", nargs="?", help='the text to read ("-" reads standard input); or --prompt and '
                     "--completion")
    ana.add_argument("--prompt", help="score --completion after this prompt")
    ana.add_argument("--completion", help="the completion to score")
    ana.add_argument("--model", help="a served model [default: the server's first]")
    ana.add_argument("--logprobs", type=int, default=3, metavar="N", help="top N alternatives per token [default 3]")
    ana.add_argument("--layers", type=int, nargs="+", metavar="L", help="lens layers [default: all]")
    ana.add_argument("--top-k", type=int, default=1, metavar="K", help="lens entries per cell [default 1]")
    ana.add_argument("--width", type=int, default=13, help="characters per lens cell [default 13]")

    sub["tokenize"].add_argument("text")
    sub["tokenize"].add_argument("--no-special", action="store_true", help="without BOS")
    sub["detokenize"].add_argument("ids", type=int, nargs="+")
    return parser


def attention_choice(layer: int | str, head: int | str) -> tuple[AttentionRequest, int | str, int | str, str]:
    """What to ask the server for, which entries of the answer to show, and how to name them:
    one index ≥ 0 is asked for alone; a negative index or "mean" needs the whole axis."""
    layers = [layer] if isinstance(layer, int) and layer >= 0 else "all"
    heads = [head] if isinstance(head, int) and head >= 0 else "mean" if head == "mean" else "all"
    request = AttentionRequest(layers=layers, heads=heads, include_prompt=False)
    pick_layer = 0 if layers != "all" else layer
    pick_head = 0 if heads != "all" else head
    label = ", ".join("mean of " + axis + "s" if i == "mean" else f"last {axis}" if i == -1 else f"{axis} {i}"
                      for axis, i in (("layer", layer), ("head", head)))
    return request, pick_layer, pick_head, label


def generate(client: Client, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = {k: getattr(args, k) for k in (
        "max_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p", "seed", "stop",
        "repetition_penalty", "frequency_penalty", "presence_penalty", "logprobs", "ignore_eos")}
    picks = None
    if args.attention:
        options["attention"], *picks = attention_choice(args.layer, args.head)
    out = sys.stdout
    with client.stream(prompt, **{k: v for k, v in options.items() if v is not None}) as stream:
        for event in stream:
            if args.json:
                out.write(to_json(event) + "\n")
            elif isinstance(event, TokenEvent):
                out.write(event.text)
            out.flush()
        completion = stream.completion
    if args.json:
        return 0
    out.write("\n")
    if args.logprobs is not None:
        out.write(logprob_table(completion) + "\n")
    if picks is not None:
        layer, head, label = picks
        out.write("\n" + token_heatmap(completion, token=args.token, layer=layer, head=head, label=label,
                                       width=args.width) + "\n")
    t = completion.timings
    print(f"[{completion.finish_reason} · {completion.usage.completion_tokens} tokens · "
          f"{t.total_ms:.0f} ms · {t.tokens_per_second:.0f} tok/s]", file=sys.stderr)
    return 0


def logprob_table(completion: Completion) -> str:
    lines = []
    for i, token in enumerate(completion.tokens):
        alternatives = "  ".join(f"{visible(a.text)} {a.logprob:.3f}" for a in token.top_logprobs or [])
        lines.append(f"{i:>3} {visible(token.text):<14} {token.logprob:8.3f}  {alternatives}".rstrip())
    return "\n".join(lines)


def analyze(client: Client, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    lens = {"layers": args.layers or "all", "top_k": args.top_k}
    analysis = client.analyze(text, prompt=args.prompt, completion=args.completion, model=args.model,
                              logprobs=args.logprobs, logit_lens=lens)
    if args.json:
        print(to_json(analysis.response))
        return 0
    print(analysis_table(analysis))
    print("\n" + lens_table(analysis, width=args.width))
    if analysis.completion_logprob is not None:
        print(f"\ncompletion logprob: {analysis.completion_logprob:.4f}")
    return 0


def analysis_table(analysis: Analysis) -> str:
    """Per token: its logprob given the tokens before it, and what the model expected instead."""
    lines = [f"{'pos':>3} {'token':<14} {'logprob':>8}  expected"]
    for i, token in enumerate(analysis.tokens):
        logprob = "" if token.logprob is None else f"{token.logprob:8.3f}"
        expected = "  ".join(f"{visible(a.text)} {a.logprob:.3f}" for a in token.top_logprobs or [])
        lines.append(f"{i:>3} {visible(token.text):<14} {logprob:>8}  {expected}".rstrip())
    return "\n".join(lines)


def lens_table(analysis: Analysis, *, width: int) -> str:
    """Layers × positions: the top prediction for the next token after each layer, and its probability."""
    lens = analysis.response.logit_lens
    tokens = analysis.tokens
    head = "layer  " + " ".join(f"{visible(t.text, width):<{width}}" for t in tokens)
    lines = ["logit lens: what each layer would predict next, at each position", head]
    for index, layer in enumerate(lens.layers):
        cells = [f"{visible('/'.join(e.text for e in entries), width - 5)} {entries[0].prob:.2f}"
                 for entries in lens.top[index]]
        lines.append(f"{layer:>5}  " + " ".join(f"{c:<{width}}" for c in cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    timeout = None if args.timeout is None else Timeout(read=args.timeout)
    with Client(args.url, api_key=args.api_key, timeout=timeout, max_retries=args.retries) as client:
        if args.command == "generate":
            return generate(client, args)
        if args.command == "analyze":
            return analyze(client, args)
        if args.command == "tokenize":
            result = client.tokenize(args.text, add_special_tokens=not args.no_special)
            if args.json:
                print(to_json(result))
            else:
                for i, token in enumerate(result.tokens):
                    print(f"{i:>4} {token.id:>7}  {visible(token.text, 40)}")
                print(f"{result.count} tokens (the context holds {result.max_context})")
        elif args.command == "detokenize":
            print(client.detokenize(args.ids))
        elif args.command == "models":
            result = client.models()
            if args.json:
                print(to_json(result))
            for card in [] if args.json else result.data:
                print(f"{card.id}  max_context={card.max_context}")
        elif args.command == "health":
            ready = client.health()
            print("ok" if ready else "not ready")
            return 0 if ready else 1
        elif args.command == "metrics":
            sys.stdout.write(client.metrics_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            where = ".".join(str(part) for part in error["loc"])
            print(f"error: invalid request: {where + ': ' if where else ''}{error['msg']}", file=sys.stderr)
        return 2
    except AttnserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. a --token or --head the answer does not have
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
