"""The one exception type users see (the CLI prints its message on one line and exits 2), the short form of a
skip reason that summaries count, and the one line for an install that cannot work."""


class UserError(Exception):
    """Bad input or configuration: the message names the file or key and the fix."""


def short_reason(reason: str) -> str:
    """'cannot decode: broken data stream (...)' -> 'cannot decode': what summaries group skips by."""
    return reason.split(" (")[0].split(":")[0]


def broken_install(e: Exception) -> str | None:
    """The one line for an install that cannot work, or None: torchvision built for another torch fails at import
    with 'operator torchvision::nms does not exist' (a CPU torch beside a CUDA torchvision, say)."""
    if "torchvision::" not in str(e) or "does not exist" not in str(e):
        return None
    from importlib.metadata import PackageNotFoundError, version
    try:
        torch_v, vision_v = version("torch"), version("torchvision")
    except PackageNotFoundError:
        return None
    return torch_pair_message(torch_v, vision_v)


def torch_pair_message(torch_v: str, vision_v: str) -> str:
    """What is installed, what this torch needs, and one command that installs both from one place: reinstalling
    torchvision alone from PyPI brought back the same mismatched wheel when the CPU index could not be reached."""
    major, minor = (int(v) for v in torch_v.split("+")[0].split(".")[:2])
    wanted = f"0.{minor + 15}" if major == 2 else "the one made for it"  # torch 2.N pairs with torchvision 0.(N+15)
    build = torch_v.partition("+")[2]  # 'cpu', 'cu126' or '' (PyPI's default build)
    need = f"torchvision {wanted}.*{f' built for {build} (+{build})' if build else ' from PyPI'}"
    both = f"pip install --force-reinstall 'torch=={torch_v.split('+')[0]}' 'torchvision=={wanted}.*'"
    fix = (f"{both} --index-url https://download.pytorch.org/whl/{build}; if that index cannot be reached, both from "
           f"PyPI instead: {both}" if build else both)
    return (f"torch {torch_v} and torchvision {vision_v} do not belong together: this torch needs {need}; install "
            f"the pair from one place: {fix} (check: python -c 'import torch, torchvision; "
            f"print(torch.__version__, torchvision.__version__)' shows the same +build)")
