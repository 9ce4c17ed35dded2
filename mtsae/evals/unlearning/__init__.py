"""SAEBench-style unlearning: the intervention (:mod:`.intervention`), multiple-choice scoring
(:mod:`.mcq`), the evaluation pipeline (:mod:`.pipeline`) and recipes (:mod:`.recipe`)."""
