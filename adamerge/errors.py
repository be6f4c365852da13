"""Exceptions raised on bad input. Each message names the model, tensor or field at fault."""


class MergeInputError(ValueError):
    """A model, checkpoint, dataset or config field cannot be merged as given."""
