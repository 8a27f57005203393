"""A model's chat template, rendered in a separate process that is killed on a timeout, on Stop or
when its output grows too large (a template is code the model brings)."""
