"""The data layer: raw readers, the record format, the synthetic corpus, tokenizer, transforms, collator."""
