"""The offline world: one fixed vocabulary and the general-text grammar the ladder pretrains on.

Task modules (workers/tasks/) own their own document formats; this package holds only what they
all share, so the tokenizer can be built without importing any task.
"""
