"""The one exception type of the porting pipeline: bad input (a missing or corrupt file, a tensor
with NaN/Inf, a LoRA for another architecture, an unsupported adapter type). Its message is one
line naming the file and the tensor; the CLI prints it and exits with status 2."""


class InputError(ValueError):
    """Bad input to loraport's pipeline; str(e) is one line naming the file and tensor."""
