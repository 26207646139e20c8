"""Tools run on a finished run: inference, missing modalities, explanations, personalisation,
and the membership-inference audit (:mod:`fedmer.posthoc.audit`)."""
