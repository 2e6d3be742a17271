"""Ask one question about one image: the smallest use of the SDK.

    python agent_examples/ask.py photo.png "is there a red circle?" --model bundle/
    python agent_examples/ask.py --model runs/vqa            # no image: a drawn demo picture
    python agent_examples/ask.py photo.png "Describe it." --adapter caption --stream
"""
import argparse

from mmagent import Agent

from demo import demo_picture  # agent_examples/demo.py


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="image file (default: a drawn demo picture)")
    p.add_argument("question", nargs="?", default="is there a circle?")
    p.add_argument("--model", default="runs/vqa", help="bundle, run directory or model directory")
    p.add_argument("--adapter", help="adapter name (default: the router picks from the question)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    args = p.parse_args()

    # on_text streams the pieces as they are decoded; the Answer still carries adapter and reason
    on_text = (lambda piece: print(piece, end="", flush=True)) if args.stream else None
    try:
        agent = Agent.load(args.model)
        answer = agent.ask(args.image or demo_picture(), args.question, adapter=args.adapter, on_text=on_text)
    except (KeyError, FileNotFoundError, ValueError) as e:  # bad model, adapter or image: say which, no traceback
        raise SystemExit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")
    if args.stream:
        print()
    print(f"answer:  {answer.text}")
    print(f"adapter: {answer.adapter or 'base'}")
    print(f"reason:  {answer.reason}")
    print(f"time:    {answer.timings['total']:.2f} s")


if __name__ == "__main__":
    main()
