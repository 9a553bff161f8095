"""Text in and out: the demo's own tokenizer and `twinlm generate`'s streamed text loop."""
