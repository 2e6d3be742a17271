"""mmagent: fine-tune a vision-language model, export it to the edge, use it from agent code.

    from mmagent import Agent
    agent = Agent.load("runs/vqa")
    print(agent.ask("photo.png", "What colour is the circle?").text)
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `mmagent --help` must not import torch
    if name in ("Agent", "Answer"):
        from mmagent import agent
        return getattr(agent, name)
    raise AttributeError(f"module 'mmagent' has no attribute {name!r}")
