"""Loading causal LMs: hub ids, local directories and the project's own pretrained ladder."""
