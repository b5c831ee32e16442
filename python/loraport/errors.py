"""loraport's own exception types and the exit statuses the CLI gives them.

InputError is bad input (a missing or corrupt file, a tensor with NaN/Inf, a LoRA for another
architecture, an unsupported adapter type, an option out of range, an output path that cannot be
written): its message is one line naming the file and the tensor, and the CLI prints it and exits
with status 2. NothingToPort is the outcome of a run whose similarity gate or target left no
module to write: not a broken input, so it gets its own status (3), and a script can tell the two
apart. Any other exception is a bug in loraport: the CLI lets it end the process with its
traceback (status 1)."""

EXIT_OK = 0
EXIT_INTERNAL = 1  # Python's own status for an uncaught exception
EXIT_INPUT = 2  # also argparse's status for a usage error
EXIT_NOTHING = 3
EXIT_CHECK_FAILED = 4  # `loraport check`: keys the base's loader would not consume, or misfits
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as `cmd | head` ends other Unix tools


class InputError(ValueError):
    """Bad input to loraport's pipeline; str(e) is one line naming the file and tensor (control
    characters, e.g. a newline in a tensor name read from a file, are shown escaped)."""

    def __init__(self, message: str):
        super().__init__(_escape_controls(str(message)))


def _escape_controls(text: str) -> str:
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class NothingToPort(InputError):
    """A valid LoRA of which no module could be ported or copied onto the target (every layer
    skipped, missing or of another shape): nothing is written (exit status 3); a catalog
    (`port_many`) reports it apart from broken files."""


def brief(e: BaseException, limit: int = 300) -> str:
    """``e`` as "Type: message" on one line of at most ``limit`` characters, for an InputError
    that quotes a library's own error (torch's unpickler writes paragraphs)."""
    text = str(e)
    marker = "WeightsUnpickler error:"  # torch.load(weights_only=True): the one informative line
    if marker in text:
        text = text[text.index(marker) :].split("Check the documentation")[0]
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"
