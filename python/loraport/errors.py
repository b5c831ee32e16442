"""The one exception type of the porting pipeline: bad input (a missing or corrupt file, a tensor
with NaN/Inf, a LoRA for another architecture, an unsupported adapter type). Its message is one
line naming the file and the tensor; the CLI prints it and exits with status 2."""


class InputError(ValueError):
    """Bad input to loraport's pipeline; str(e) is one line naming the file and tensor."""


class NothingToPort(InputError):
    """A valid LoRA of which no module could be ported or copied onto the target (every layer
    skipped, missing or of another shape): nothing is written. Still bad input for `port`; a
    catalog (`port_many`) reports it apart from broken files."""
