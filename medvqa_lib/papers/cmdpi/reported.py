"""What the CMDPI paper reports: Tables 1 (VQA-RAD) and 2 (SLAKE), next to which the chapter
puts its own runs (every number here is *reported*, none is measured)."""

__all__ = ["PRETRAIN_GROUP", "REPORTED"]

#: the CMDPI paper's Tables 1 (VQA-RAD) and 2 (SLAKE): (model, closed, open, overall) in %
REPORTED: dict[str, list[tuple[str, float, float, float]]] = {
    "vqa-rad": [("MEVF", 76.5, 43.0, 63.2), ("VQA-MIX", 82.4, 63.1, 74.7), ("MLPs-Base", 81.3, 53.1, 70.2),
                ("VG-CALF", 85.5, 67.0, 76.1), ("ACMA-MAM", 84.4, 63.6, 76.1), ("CPCR", 80.4, 60.5, 72.5),
                ("WSRP", 82.7, 67.6, 76.7), ("VQA-Adapter", 82.3, 66.1, 75.8), ("MKGF", 81.7, 61.7, 71.7),
                ("VB-MVQA", 78.1, 61.3, 71.3), ("MITER", 80.5, 59.4, 72.1), ("CMDPI", 85.7, 74.3, 78.7),
                ("M3AE", 83.5, 67.2, 77.0), ("BiomedCLIP", 76.5, 67.0, 72.7), ("LLaVA-Med*", 84.2, 61.5, 75.2),
                ("UniMed-LVLM*", 75.4, 26.2, 55.8), ("PeFoMed*", 87.1, 62.6, 77.4)],
    "slake": [("MEVF", 81.7, 76.1, 78.3), ("VQA-MIX", 80.8, 77.2, 78.6), ("MLPs-Base", 88.5, 79.9, 82.9),
              ("VG-CALF", 83.8, 81.4, 83.3), ("ACMA-MAM", 86.7, 80.8, 83.1), ("CPCR", 84.1, 80.5, 81.9),
              ("WSRP", 83.9, 76.7, 79.5), ("VQA-Adapter", 83.7, 79.2, 81.0), ("MKGF", 82.0, 65.8, 74.3),
              ("VB-MVQA", 80.5, 77.0, 78.7), ("MITER", 84.4, 79.2, 81.2), ("CMDPI", 88.0, 80.6, 83.5),
              ("M3AE", 87.8, 80.3, 83.2), ("BiomedCLIP", 88.9, 84.3, 86.1), ("LLaVA-Med*", 85.3, 83.1, 84.0),
              ("UniMed-LVLM*", 84.4, 84.0, 84.2), ("PeFoMed*", 88.7, 77.8, 82.1)],
}
#: the compared models the paper groups as pre-trained on more than 200k samples
PRETRAIN_GROUP: set[str] = {"M3AE", "BiomedCLIP", "LLaVA-Med*", "UniMed-LVLM*", "PeFoMed*"}
