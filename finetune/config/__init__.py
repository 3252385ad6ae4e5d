"""Config language: strict models, sweep knobs, loading with source positions, schemas."""

from finetune.config.loading import ConfigLoadError, SourceDoc, load_document
from finetune.config.validation import ConfigInvalid, ConfigIssue, validate_document

__all__ = ["ConfigInvalid", "ConfigIssue", "ConfigLoadError", "SourceDoc", "load_document", "validate_document"]
