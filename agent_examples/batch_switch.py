"""A batch of (image, task) jobs on one loaded model, switching task adapters job by job.

    python agent_examples/batch_switch.py a.png b.png --model bundle/
    python agent_examples/batch_switch.py --model bundle/          # no images: a drawn demo picture

Every image gets a caption job and two question jobs. Switching is per call and cheap (a LoRA is
activated, nothing is reloaded), so the jobs run in the order given. A task with no adapter of its name
is left to the router.
"""
import argparse
import os
import time

from mmagent import Agent

from demo import demo_picture  # agent_examples/demo.py

# (task, instruction): the task names the adapter, whatever the wording (the router alone would send
# the first one to VQA: it has no caption cue)
TASKS = [("caption", "One sentence for this picture."), ("vqa", "how many shapes are there?"),
         ("vqa", "is there a red circle?")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", help="image files (default: a drawn demo picture)")
    p.add_argument("--model", default="runs/vqa", help="bundle, run directory or model directory")
    args = p.parse_args()

    try:
        agent = Agent.load(args.model)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    images = [(os.path.basename(path), path) for path in args.images] or [("demo", demo_picture())]
    jobs = [(name, image, task, question) for name, image in images for task, question in TASKS]
    print(f"{len(jobs)} jobs; adapters: {', '.join(agent.adapters)}")

    start, previous, switches = time.perf_counter(), None, 0
    for i, (name, image, task, question) in enumerate(jobs, 1):
        adapter = task if task in agent.adapters else None  # None: the router decides from the question
        try:
            answer = agent.ask(image, question, adapter=adapter)
        except ValueError as e:  # an unreadable image fails its jobs, not the batch
            print(f"[{i}] {name} {task}: error: {e}")
            continue
        switches += previous is not None and answer.adapter != previous
        previous = answer.adapter
        print(f"[{i}] {name} {task} -> adapter {answer.adapter or 'base'} in {answer.timings['total']:.2f} s: "
              f"{answer.text[:60]!r}")
    print(f"total: {len(jobs)} jobs in {time.perf_counter() - start:.2f} s, {switches} adapter switches")


if __name__ == "__main__":
    main()
