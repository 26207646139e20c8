"""Per-client DP fine-tune of the fusion head, written to the node's ledger (``fedmer personalize``)."""

from fedmer.posthoc.personalize.finetune import PersonalizeError, PersonalizeSettings, finetune_head
from fedmer.posthoc.personalize.report import format_table, personalize_run

__all__ = ["PersonalizeError", "PersonalizeSettings", "finetune_head", "format_table", "personalize_run"]
