"""SAEBench-style unlearning: settings (:mod:`.config`), corpora and questions (:mod:`.corpora`), feature
selection and the sweep (:mod:`.selection`), the clamp (:mod:`.intervention`), multiple-choice scoring
(:mod:`.mcq`), the evaluation (:mod:`.pipeline`), its outputs (:mod:`.report`) and recipes
(:mod:`.recipe`); the entry point of the command and the callback: :mod:`.run`."""
