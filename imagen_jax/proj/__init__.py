"""Research projects built on the generic library. Nothing outside `proj/` imports them:
a config names their code as a string (`train.aux_losses.NAME.fn`), as big_vision's
configs name `proj` models."""
