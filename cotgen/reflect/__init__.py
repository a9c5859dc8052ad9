"""PARM++ (paper section 5): reflections (text), the judge's reflection head (judge),
reflection groups (data), the self-correction generator (corrector) and their stages."""
