"""Simulated single-cell drug-response cohorts that look like scDrugMap's data.

Why: the demo, the benchmarks and the tests need cohorts of realistic size and structure without
shipping patient data. A simulated cohort has what makes the real task hard:

* raw UMI-like counts: negative binomial per gene (gamma-Poisson), log-normal gene means, a few
  highly expressed housekeeping / ribosomal / mitochondrial genes, per-cell library sizes, sparse;
* sample-level labels, as in scDrugMap: in cell-line-like datasets the pre-treatment sample is
  ``sensitive`` and the post-treatment one ``resistant``; in patient datasets every sample of a
  patient carries that patient's response. No sample mixes labels;
* a response program (``effect``): core response genes shared by all datasets plus some genes of
  each dataset's own, switched on with cell-to-cell variable strength in resistant cells (weakly
  in some sensitive ones);
* patient and sample batch effects (``batch_effect``, gene-wise log-normal multipliers) and cell
  states whose mix varies per sample. Labels are sample-level, so a classifier can score by
  recognising samples: cell-level CV looks better than sample- or patient-grouped CV, as it does
  on real data;
* a dataset effect (``dataset_effect``) of platform / tissue: per-gene shifts and library depth.

Ground truth goes to ``adata.uns["simulation"]`` (response genes and their log-fold changes) and
the dataset metadata to ``adata.uns["dataset"]``.

Speed (measured once on a 2-core machine, numpy 2.4, single-threaded): the whole paper-sized
collection, 326,751 cells x 2,000 genes, takes about 35 s with about 0.9 GB peak memory when the
generator is consumed one dataset at a time. Cells are drawn in blocks of 4,096 so the dense
temporaries stay near 100 MB; the biggest dataset, Data19 (61,001 cells), is ~300 MB as int32
CSR at ~29 % density (~1,300 counts per cell). The default ``simulate_cohort()`` takes ~0.3 s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "GENE_SYMBOLS",
    "PAPER_DATASETS",
    "PaperDataset",
    "default_genes",
    "paper_table",
    "simulate_cohort",
    "simulate_paper_collection",
    "write_cohort",
]


# --------------------------------------------------------------------------------------------
# The paper's primary collection
# --------------------------------------------------------------------------------------------


class PaperDataset(NamedTuple):
    """One dataset of scDrugMap's primary collection (see :data:`PAPER_DATASETS`)."""

    name: str
    accession: str
    tissue: str
    cancer_type: str
    therapy: str
    regimen: str
    n_samples: int
    n_sensitive_samples: int
    n_resistant_samples: int
    n_patients: int
    timepoint: str
    cells: int
    sensitive: int
    resistant: int


def _row(name, accession, tissue, cancer, therapy, regimen, n_sens_s, n_res_s, n_patients,
         timepoint, sensitive, resistant):
    return PaperDataset(name, accession, tissue, cancer, therapy, regimen, n_sens_s + n_res_s,
                        n_sens_s, n_res_s, n_patients, timepoint, sensitive + resistant,
                        sensitive, resistant)


#: The 36 datasets of scDrugMap's primary collection (Wang et al., "scDrugMap", arXiv 2505.05612).
#:
#: Source. Metadata (accession, tissue, cancer type, therapy type, regimen, sample counts) is
#: Supplementary Table 1 (the dataset catalog; ``n_samples`` is its ``Sample_size_all`` and the
#: per-class sample counts come from its ``Sample_size`` text). Cell counts are Supplementary
#: Table 2, which counts cells per tissue, cancer type, therapy type and *regimen*, not per
#: dataset. Where a regimen is a single dataset its row is copied. Where it spans several
#: datasets (Data1+2, Data3+4, Data5+6, Data8+27, Data16+20+21, Data25+26) the regimen's
#: sensitive cells are split between its datasets in proportion to their numbers of sensitive
#: samples, and its resistant cells in proportion to their resistant samples, by largest
#: remainder (ties to the earlier dataset), so the integers add up to the regimen row exactly.
#: Data19 (GSE138267, SCLC CDX, chemotherapy) has no regimen row; it is the "Lung cancer" row
#: (72,431 / 41,732 / 30,699) minus Data9, 11, 22 and 23: 61,001 cells, 37,661 sensitive,
#: 23,340 resistant, and the catalog leaves its regimen blank.
#:
#: Check. The table reproduces every tissue, cancer-type and therapy-type row of Supplementary
#: Table 2 and the total (326,751 cells, 162,957 sensitive, 163,794 resistant), with one
#: exception that is the paper's own typo: its "Acute lymphoblastic leukemia" row lists
#: Data25, 26 (AML) but its numbers (27,912 / 13,005 / 14,907) are Data17 + Data33, the two
#: ALL datasets here.
#:
#: Design columns (used to lay out samples and patients). ``timepoint`` is ``"pre/post"`` where
#: the sensitive samples are pre-treatment and the resistant ones post-treatment samples of the
#: same ``n_patients`` patients or cell lines (the cell-line design); ``"pre"``, ``"post"`` or
#: ``"unspecified"`` where each sample is a different patient / PDX, labelled by its response.
#: ``n_patients`` follows the catalog's descriptions (Data13 describes two cell lines but has one
#: sample per class, so it gets one).
PAPER_DATASETS: tuple[PaperDataset, ...] = (
    _row("Data1", "GSE161801_PI", "Bone marrow aspirate", "Multiple myeloma", "Targeted therapy",
         "carfilzomib + dexamethasone", 1, 2, 3, "pre", 466, 1245),
    _row("Data2", "GSE161801_PI", "Bone marrow aspirate", "Multiple myeloma", "Targeted therapy",
         "carfilzomib + dexamethasone", 1, 2, 3, "post", 465, 1245),
    _row("Data3", "GSE161801_IMiD", "Bone marrow aspirate", "Multiple myeloma", "Targeted therapy",
         "pomalidomide + dexamethasone OR lenalidomide + dexamethasone",
         2, 6, 8, "pre", 5228, 10860),
    _row("Data4", "GSE161801_IMiD", "Bone marrow aspirate", "Multiple myeloma", "Targeted therapy",
         "pomalidomide + dexamethasone OR lenalidomide + dexamethasone",
         3, 6, 9, "post", 7841, 10859),
    _row("Data5", "GSE161195", "Bone marrow aspirate", "Multiple myeloma", "Targeted therapy",
         "DARA-KRD (daratumumab + carfilzomib + lenalidomide + dexamethasone)",
         21, 7, 28, "pre", 13845, 5683),
    _row("Data6", "GSE161195", "Bone marrow aspirate", "Multiple myeloma", "Targeted therapy",
         "DARA-KRD (daratumumab + carfilzomib + lenalidomide + dexamethasone)",
         15, 5, 20, "post", 9889, 4060),
    _row("Data7", "GSE164551", "Bone marrow aspirate", "Multiple myeloma", "Immunotherapy",
         "CAR-T", 1, 1, 1, "pre/post", 8, 316),
    _row("Data8", "GSE163836", "Cell line", "Breast cancer", "Chemotherapy",
         "paclitaxel", 1, 1, 1, "pre/post", 1013, 3066),
    _row("Data9", "GSE139386", "Cell line", "Lung cancer", "Targeted therapy",
         "ceritinib", 1, 1, 1, "pre/post", 2364, 4622),
    _row("Data10", "GSE186960", "Cell line", "Pancreatic cancer", "Chemotherapy",
         "gemcitabine", 1, 1, 1, "pre/post", 698, 5438),
    _row("Data11", "GSE149214", "Cell line", "Lung cancer", "Targeted therapy",
         "erlotinib", 1, 1, 1, "pre/post", 1111, 1282),
    _row("Data12", "GSE140440", "Cell line", "Prostate cancer", "Chemotherapy",
         "docetaxel", 2, 2, 2, "pre/post", 134, 150),
    _row("Data13", "GSE115251", "Cell line", "Neuroblastoma", "Targeted therapy",
         "TAE684", 1, 1, 1, "pre/post", 5492, 6298),
    _row("Data14", "GSE104987", "Cell line", "Breast cancer", "Targeted therapy",
         "KDM5-C70", 1, 1, 1, "pre/post", 1072, 1597),
    _row("Data15", "GSE108397", "Cell line", "Melanoma", "Targeted therapy",
         "PLX-4720", 1, 1, 1, "pre/post", 3286, 3262),
    _row("Data16", "GSE152469", "Peripheral blood mononuclear cells",
         "Chronic lymphocytic leukemia", "Targeted therapy",
         "ibrutinib", 1, 1, 1, "pre/post", 1772, 3751),
    _row("Data17", "GSE153697", "Bone marrow aspirate",
         "Acute lymphoblastic leukemia", "Immunotherapy",
         "anti-CD19 CAR-T", 1, 1, 1, "pre/post", 1176, 710),
    _row("Data18", "GSE175716", "Tumor tissue", "Liver cancer", "Targeted therapy",
         "sorafenib", 2, 1, 3, "unspecified", 5865, 958),
    _row("Data19", "GSE138267", "Tumor tissue", "Lung cancer", "Chemotherapy",
         "chemotherapy (not specified)", 4, 4, 8, "unspecified", 37661, 23340),
    _row("Data20", "GSE111014", "Peripheral blood mononuclear cells",
         "Chronic lymphocytic leukemia", "Targeted therapy",
         "ibrutinib", 3, 1, 4, "pre", 5317, 3750),
    _row("Data21", "GSE111014", "Peripheral blood mononuclear cells",
         "Chronic lymphocytic leukemia", "Targeted therapy",
         "ibrutinib", 3, 1, 4, "post", 5317, 3750),
    _row("Data22", "GSE207422", "Tumor tissue", "Lung cancer", "Immunotherapy",
         "toripalimab + carboplatin + (docetaxel or pemetrexed or emcitabine)",
         2, 3, 5, "post", 455, 687),
    _row("Data23", "GSE207422", "Tumor tissue", "Lung cancer", "Immunotherapy",
         "sintilimab + carboplatin + (docetaxel or pemetrexed or emcitabine)",
         2, 5, 7, "post", 141, 768),
    _row("Data24", "GSE150930", "Peripheral blood mononuclear cells",
         "Chronic lymphocytic leukemia", "Immunotherapy",
         "rituximab + cyclophosphamide + fludarabine", 1, 1, 1, "pre/post", 851, 1191),
    _row("Data25", "GSE162117", "Peripheral blood mononuclear cells",
         "Acute myeloid leukemia", "Targeted therapy",
         "ficlatuzumab", 7, 4, 11, "pre", 6018, 7804),
    _row("Data26", "GSE162117", "Peripheral blood mononuclear cells",
         "Acute myeloid leukemia", "Targeted therapy",
         "ficlatuzumab", 6, 3, 9, "post", 5159, 5853),
    _row("Data27", "GSE131984", "Cell line", "Breast cancer", "Chemotherapy",
         "paclitaxel", 2, 1, 1, "pre/post", 2026, 3066),
    _row("Data28", "GSE131984", "Cell line", "Breast cancer", "Targeted therapy",
         "JQ1", 2, 2, 1, "pre/post", 1061, 1565),
    _row("Data29", "GSE131984", "Cell line", "Breast cancer", "Targeted therapy",
         "palbociclib", 2, 1, 1, "pre/post", 1061, 693),
    _row("Data30", "GSE131984", "Cell line", "Breast cancer", "Targeted therapy",
         "JQ1 + paclitaxel", 2, 1, 1, "pre/post", 1061, 643),
    _row("Data31", "GSE131984", "Cell line", "Breast cancer", "Targeted therapy",
         "JQ1 + palbociclib", 2, 1, 1, "pre/post", 1061, 1024),
    _row("Data32", "GSE168668", "Cell line", "Prostate cancer", "Targeted therapy",
         "enzalutamide", 1, 2, 1, "pre/post", 2156, 8542),
    _row("Data33", "GSE158457", "Cell line", "Acute lymphoblastic leukemia", "Targeted therapy",
         "dasatinib", 2, 2, 2, "pre/post", 11829, 14197),
    _row("Data34", "GSE164897", "Cell line", "Melanoma", "Targeted therapy",
         "vemurafenib", 1, 1, 1, "pre/post", 6686, 4322),
    _row("Data35", "GSE164897", "Cell line", "Melanoma", "Targeted therapy",
         "vemurafenib + combimetinib", 1, 1, 1, "pre/post", 6686, 8165),
    _row("Data36", "GSE164897", "Cell line", "Melanoma", "Targeted therapy",
         "vemurafenib + trametinib", 1, 1, 1, "pre/post", 6686, 9032),
)


def paper_table() -> pd.DataFrame:
    """:data:`PAPER_DATASETS` as a DataFrame indexed by dataset name, for reports."""
    return pd.DataFrame(PAPER_DATASETS, columns=PaperDataset._fields).set_index("name")


# --------------------------------------------------------------------------------------------
# Genes
# --------------------------------------------------------------------------------------------

# 2,000 approved HGNC symbols, each present in the Geneformer and scGPT gene vocabularies so that
# simulated data tokenises like real data: well-known markers, cancer and drug-response genes
# first, then members of large gene families. The first _N_HIGH are housekeeping, ribosomal and
# mitochondrial genes that dominate real UMI counts.
GENE_SYMBOLS: tuple[str, ...] = tuple("""
    ACTB GAPDH B2M TMSB4X TMSB10 MALAT1 NEAT1 EEF1A1 EEF2 TPT1 FTL FTH1 MYL6 PTMA HSP90AA1
    HSP90AB1 HSPA8 HSPA1A HSPA1B UBB UBC PPIA TUBA1B TUBB VIM LDHA PGK1 ENO1 ALDOA PKM TPI1 NPM1
    HNRNPA1 YBX1 SRSF3 EIF1 EIF4A1 CFL1 PFN1 ARPC2 S100A4 S100A6 S100A8 S100A9 S100A10 S100A11
    LGALS1 LGALS3 ANXA1 ANXA2 CALM1 CALM2 SERF2 H3-3B MT-CO1 MT-CO2 MT-CO3 MT-ND1 MT-ND2 MT-ND3
    MT-ND4 MT-ND4L MT-ND5 MT-ND6 MT-CYB MT-ATP6 MT-ATP8 RPL3 RPL4 RPL5 RPL6 RPL7 RPL7A RPL8 RPL9
    RPL10 RPL10A RPL11 RPL12 RPL13 RPL13A RPL14 RPL15 RPL17 RPL18 RPL18A RPL19 RPL21 RPL22 RPL23
    RPL23A RPL24 RPL26 RPL27 RPL27A RPL28 RPL29 RPL30 RPL31 RPL32 RPL34 RPL35 RPL35A RPL36 RPL37
    RPL37A RPL38 RPL39 RPL41 RPLP0 RPLP1 RPLP2 RPS2 RPS3 RPS3A RPS4X RPS5 RPS6 RPS7 RPS8 RPS9
    RPS10 RPS11 RPS12 RPS13 RPS14 RPS15 RPS15A RPS16 RPS17 RPS18 RPS19 RPS20 RPS21 RPS23 RPS24
    RPS25 RPS26 RPS27 RPS27A RPS28 RPS29 RPSA PTPRC CD3D CD3E CD3G CD2 CD4 CD8A CD8B CD19 MS4A1
    CD79A CD79B CD14 FCGR3A LYZ CST3 NKG7 GNLY GZMA GZMB GZMK GZMH PRF1 KLRD1 KLRB1 NCAM1 IL7R
    CCR7 SELL LEF1 TCF7 FOXP3 IL2RA CTLA4 PDCD1 LAG3 HAVCR2 TIGIT TOX CD274 PDCD1LG2 CD38 SDC1
    MZB1 JCHAIN IGHM IGKC IGLC2 XBP1 PRDM1 IRF4 CD27 TNFRSF17 SLAMF7 ITGAM ITGAX CD68 CD163 MRC1
    CSF1R FCER1G TYROBP AIF1 LST1 HLA-DRA HLA-DRB1 HLA-DPA1 HLA-DPB1 HLA-DQA1 HLA-DQB1 HLA-A HLA-B
    HLA-C HLA-E CD74 PPBP PF4 HBB HBA1 HBA2 MPO ELANE AZU1 PRTN3 CTSG CD34 KIT FLT3 CEBPA SPI1
    GATA1 GATA2 GATA3 TAL1 RUNX1 MEIS1 HOXA9 CD33 IL3RA EPCAM KRT8 KRT18 KRT19 KRT5 KRT14 KRT17
    KRT7 KRT20 CDH1 CDH2 MUC1 ESR1 PGR ERBB2 AR KLK3 FOLH1 NKX3-1 TMPRSS2 MKI67 TOP2A PCNA MCM2
    MCM3 MCM4 MCM5 MCM6 MCM7 CCNB1 CCNB2 CCNA2 CCND1 CCNE1 CDK1 CDK2 CDK4 CDK6 CDKN1A CDKN1B
    CDKN2A RB1 TP53 MDM2 MYC MYCN MAX EGFR KRAS NRAS HRAS BRAF RAF1 MAP2K1 MAP2K2 MAPK1 MAPK3
    PIK3CA PTEN AKT1 MTOR ALK MET AXL ROS1 RET NTRK1 FGFR1 FGFR2 FGFR3 PDGFRA PDGFRB KDR FLT1
    VEGFA ABL1 BCR BTK BCL2 BCL2L1 MCL1 BAX BAK1 BIRC5 XIAP CASP3 CASP8 FAS ABCB1 ABCC1 ABCG2
    ALDH1A1 CD44 PROM1 SOX2 SOX9 SOX10 MITF PMEL MLANA TYR DCT NGFR TWIST1 SNAI1 SNAI2 ZEB1 ZEB2
    FN1 COL1A1 COL1A2 COL3A1 SPARC ACTA2 TAGLN PDGFB TGFB1 TGFBR1 TGFBR2 SMAD2 SMAD3 SMAD4 NOTCH1
    HES1 JAG1 CTNNB1 APC AXIN2 LGR5 WNT5A YAP1 TEAD1 CCN1 CCN2 ERBB3 IGF1R INSR JAK1 JAK2 STAT1
    STAT3 STAT5A IRF1 ISG15 IFIT1 IFIT3 MX1 OAS1 IFI6 IFI27 IFITM1 IFITM3 NFKBIA NFKB1 RELA TNF
    IL6 IL1B CXCL8 CXCL10 CCL2 CCL5 JUN JUNB FOS FOSB EGR1 ATF3 IER2 DUSP1 KLF4 KLF6 HIF1A EPAS1
    CA9 SLC2A1 HK2 NQO1 HMOX1 GPX4 SOD2 TXN TXNRD1 GCLM SLC7A11 NFE2L2 KEAP1 BRCA1 BRCA2 ATM ATR
    CHEK1 CHEK2 PARP1 RAD51 XRCC1 ERCC1 MLH1 MSH2 TOP1 TYMS RRM1 RRM2 DCK CDA TUBB3 NR3C1 ESR2
    FOXA1 GRHL2 ELF3 CLDN4 CLDN7 TACSTD2 CEACAM5 CEACAM6 MSLN AFP ALB APOA1 APOB TTR GPC3 NAPSA
    SFTPC SFTPB NKX2-1 ASCL1 NEUROD1 INSM1 CHGA SYP DLL3 PHOX2B HAND2 TH DBH LIN28B ENO2 CCND2
    CCND3 NSD2 MAF MAFB CRBN IKZF1 IKZF3 PSMB5 PSMB8 PSMB9 CD40 CD80 CD86 ICOS TNFRSF4 TNFRSF9
    TNFRSF18 BTLA VSIR IDO1 ARG1 NOS2 CXCR4 CXCL12 CCR5 CXCR3 CD69 ITGAE ENTPD1 NT5E KLRG1 KLRC1
    KLRK1 FCGR1A FCGR2A ITGB2 SPP1 APOE C1QA C1QB C1QC MARCO LILRB1 LILRB2 SIGLEC10 CD47 SIRPA
    CLEC4C LAMP3 IL10 IL12A IL12B IFNG IL2 IL4 IL13 IL17A IL21 IL22 TGFB2 TGFB3 VEGFC ANGPT2 TEK
    PECAM1 VWF CDH5 ENG MCAM THY1 FAP PDPN LUM DCN POSTN MMP2 MMP9 MMP1 MMP7 MMP11 TIMP1 SERPINE1
    PLAU PLAUR ITGB1 ITGA5 ITGAV ITGB3 ITGB4 ITGA6 LAMB3 LAMC2 KRT6A KRT16 SPRR1B IVL TP63 AREG
    EREG HBEGF TGFA EGF NRG1 IGF2 IGFBP3 IGFBP5 IGFBP7 CHI3L1 CXCL1 CXCL2 CXCL5 CCL20 LCN2 SAA1
    SAA2 CRP FGB FGA FGG HP ORM1 SERPINA1 TF CYP3A4 CYP2D6 CYP1A1 CYP1B1 UGT1A1 GSTP1 GSTM1 MGMT
    DHFR SLC29A1 SLC28A1 ABCC2 ABCC3 ATP7A ATP7B MT1X MT2A MT1E ZNF2 TMEM9 CCDC3 SLC25A1 SLC35A1
    ANKRD1 LRRC1 WDR1 TRIM2 RNF2 USP1 KLHL1 DNAJA1 DNAJB1 DNAJC1 PSMA1 PSMB1 PSMC1 PSMD1 NDUFA1
    NDUFB1 NDUFS1 NDUFV1 COX10 SNRPA MRPL1 MRPS2 EIF2S1 EIF3A KRT1 CCL1 KIF6 CENPA SLC7A1 SLC1A1
    SLC12A1 SLC16A1 SLC38A1 SLC39A1 SLC30A1 ATP6V1A HNRNPC SRSF1 POLR2A CDCA2 FAM3A ZNF3 TMEM11
    CCDC6 SLC25A2 SLC35A2 ANKRD2 LRRC2 WDR3 TRIM3 RNF4 USP2 KLHL2 DNAJA2 DNAJB2 DNAJC2 PSMA2 PSMB2
    PSMC2 PSMD2 NDUFA2 NDUFB2 NDUFS2 NDUFV2 COX11 SNRPB MRPL2 MRPS5 EIF2S2 EIF3B KRT2 IL3 KIF7
    CENPB SLC2A2 SLC7A2 SLC1A2 SLC12A2 SLC16A2 SLC38A2 SLC39A2 SLC30A2 ATP6V1D HNRNPD SRSF2 POLR2B
    CDCA3 FAM3B ZNF7 TMEM17 CCDC7 SLC25A3 SLC35A3 ANKRD6 LRRC3 WDR4 TRIM4 RNF5 USP3 KLHL3 DNAJA3
    DNAJB3 DNAJC3 PSMA3 PSMB3 PSMC3 PSMD3 NDUFA3 NDUFB3 NDUFS3 NDUFV3 COX14 SNRPC MRPL3 MRPS6
    EIF2S3 EIF3C KRT3 CD5 CXCL3 CCL3 KIF9 CENPC SLC2A3 SLC7A3 SLC1A3 SLC12A3 SLC16A3 SLC38A3
    SLC39A3 SLC30A3 ATP6V1F HNRNPF POLR2C CDCA4 FAM3C ZNF8 TMEM18 CCDC8 SLC25A4 SLC35A4 ANKRD7
    LRRC4 WDR5 TRIM5 RNF6 USP4 KLHL4 DNAJA4 DNAJB4 DNAJC4 PSMA4 PSMB4 PSMC4 PSMD4 NDUFA4 NDUFB4
    NDUFS4 COX15 SNRPE MRPL4 MRPS7 EIF3D KRT4 CD6 IL5 CCL4 KIF11 CENPE SLC2A4 SLC7A4 SLC1A4
    SLC12A4 SLC16A4 SLC38A4 SLC39A4 SLC30A4 ATP6V1H HNRNPK SRSF4 POLR2D CDCA5 FAM9A ZNF10 TMEM19
    CCDC9 SLC25A5 SLC35A5 ANKRD9 LRRC7 WDR6 TRIM6 RNF7 USP5 KLHL5 DNAJB5 DNAJC5 PSMA5 PSMC5 PSMD5
    NDUFA5 NDUFB5 NDUFS5 COX16 SNRPF MRPL9 MRPS9 EIF3E CD7 CXCL6 KIF12 CENPF SLC2A5 SLC7A5 SLC1A5
    SLC12A5 SLC16A5 SLC38A5 SLC39A5 SLC30A5 ATP6V1B1 HNRNPL SRSF5 POLR2E CDCA7 FAM9B ZNF12 TMEM25
    CCDC12 SLC25A6 SLC35B1 ANKRD10 LRRC9 WDR7 TRIM7 RNF8 USP6 KLHL6 DNAJB6 DNAJC6 PSMA6 PSMB6
    PSMC6 PSMD6 NDUFA6 NDUFB6 NDUFS6 COX17 SNRPG MRPL10 MRPS10 EIF3F CD9 IL7 CCL7 KIF14 CENPH
    SLC2A6 SLC7A6 SLC1A6 SLC12A6 SLC16A6 SLC38A6 SLC39A6 SLC30A6 ATP6V1B2 HNRNPM SRSF6 POLR2F
    CDCA8 FAM9C ZNF14 TMEM26 CCDC13 SLC25A10 SLC35B2 ANKRD11 LRRC10 WDR11 TRIM8 RNF10 USP7 KLHL7
    DNAJB7 DNAJC7 PSMA7 PSMB7 PSMD7 NDUFA7 NDUFB7 NDUFS7 COX18 SNRPN MRPL11 MRPS11 EIF3G IL9 CXCL9
    CCL8 KIF15 CENPI SLC2A7 SLC7A7 SLC1A7 SLC12A7 SLC16A7 SLC38A7 SLC39A7 SLC30A7 ATP6V1C1 HNRNPR
    SRSF7 POLR2G CDC6 FAM13A ZNF16 TMEM31 CCDC14 SLC25A11 SLC35B3 ANKRD12 LRRC14 WDR12 TRIM9 RNF11
    USP8 KLHL8 DNAJB8 DNAJC8 PSMA8 PSMD8 NDUFA8 NDUFB8 NDUFS8 COX19 SNRPA1 MRPL12 MRPS12 EIF3H
    KRT9 CCL11 KIF17 CENPJ SLC2A8 SLC7A8 SLC12A8 SLC16A8 SLC38A8 SLC39A8 SLC30A8 ATP6V1C2 HNRNPU
    SRSF8 POLR2H CDC7 FAM13B ZNF17 TMEM33 CCDC15 SLC25A12 SLC35B4 ANKRD16 LRRC15 WDR13 TRIM10
    RNF13 USP10 KLHL9 DNAJB9 DNAJC9 PSMD9 NDUFA9 NDUFB9 COX20 SNRPB2 MRPL13 MRPS14 EIF3I KRT10
    CD22 IL11 CXCL11 CCL13 KIF19 CENPK SLC2A9 SLC7A9 SLC12A9 SLC16A9 SLC38A9 SLC39A9 SLC30A9
    ATP6V1E1 SRSF9 POLR2I CDC16 FAM13C ZNF18 TMEM37 CCDC17 SLC25A13 SLC35C1 ANKRD17 LRRC17 WDR17
    TRIM11 RNF14 USP11 KLHL10 DNAJB11 DNAJC10 PSMB10 PSMD10 NDUFA10 NDUFB10 COX5A SNRPD1 MRPL14
    MRPS15 EIF3J KRT12 CD24 CCL14 KIF22 CENPL SLC2A10 SLC7A10 SLC16A10 SLC38A10 SLC39A10 SLC30A10
    ATP6V1E2 HNRNPA3 SRSF10 POLR2J FAM20A ZNF19 TMEM40 CCDC18 SLC25A14 SLC35C2 ANKRD22 LRRC18
    WDR18 TRIM13 RNF17 USP12 KLHL11 DNAJB12 DNAJC11 PSMB11 PSMD11 NDUFA11 NDUFB11 COX5B SNRPD2
    MRPL15 MRPS16 EIF3K KRT13 IL15 CXCL13 CCL15 KIF23 CENPM SLC2A11 SLC16A11 SLC38A11 SLC39A11
    ATP6V1G1 HNRNPH1 SRSF11 POLR2K FAM20B ZNF20 TMEM42 CCDC22 SLC25A15 SLC35D1 ANKRD23 LRRC19
    WDR19 TRIM14 RNF20 USP13 KLHL12 DNAJB13 DNAJC12 PSMD12 NDUFA12 COX6C SNRPD3 MRPL16 MRPS17
    EIF3L CD28 IL16 CXCL14 CCL16 KIF24 CENPN SLC2A12 SLC7A13 SLC16A12 SLC39A12 ATP6V1G2 HNRNPH2
    SRSF12 POLR2L FAM20C ZNF22 TMEM43 CCDC24 SLC25A16 SLC35D2 ANKRD24 LRRC20 WDR20 TRIM15 RNF24
    USP14 KLHL13 DNAJB14 DNAJC13 PSMD13 NDUFA13 COX7B MRPL17 MRPS21 EIF3M KRT15 IL18 CXCL16 CCL17
    KIF25 CENPO SLC2A13 SLC7A14 SLC16A13 SLC39A13 ATP6V1G3 HNRNPH3 POLR2M FAM24A ZNF23 TMEM44
    CCDC25 SLC25A17 SLC35D3 ANKRD26 LRRC23 WDR24 TRIM16 RNF25 USP15 KLHL14 DNAJC14 PSMD14 COX7C
    MRPL18 MRPS22 IL19 CXCL17 CCL18 KIF27 CENPP SLC2A14 SLC16A14 SLC39A14 FAM24B ZNF24 TMEM47
    CCDC26 SLC25A18 SLC35E1 ANKRD27 LRRC24 WDR25 TRIM17 RNF26 USP16 KLHL15 DNAJC15 COX8A MRPL19
    MRPS23 CD36 IL20 CCL19 CENPQ FAM25A ZNF25 TMEM51 CCDC27 SLC25A19 SLC35E3 ANKRD28 LRRC25 WDR26
    TRIM21 RNF31 USP18 KLHL17 DNAJC16 COX8C MRPL20 MRPS24 CD37 CENPS FAM25C ZNF26 TMEM52 CCDC30
    SLC25A20 SLC35E4 ANKRD29 LRRC26 WDR27 TRIM22 RNF32 USP19 KLHL18 DNAJC17 MRPL21 MRPS25 CCL21
    CENPT FAM27B ZNF28 TMEM53 CCDC32 SLC25A21 SLC35F1 ANKRD31 LRRC27 WDR31 TRIM23 RNF34 USP20
    KLHL20 DNAJC18 MRPL22 MRPS26 IL24 CCL22 CENPU FAM27C ZNF30 TMEM54 CCDC33 SLC25A22 SLC35F2
    ANKRD33 LRRC28 WDR33 TRIM24 RNF38 USP21 KLHL21 DNAJC19 MRPL23 MRPS27 KRT23 IL25 CCL23 CENPV
    FAM30A ZNF32 TMEM59 CCDC34 SLC25A23 SLC35F3 ANKRD35 LRRC30 WDR35 TRIM25 RNF39 USP22 KLHL22
    DNAJC21 MRPL24 MRPS28 KRT24 CD46 IL26 CCL24 CENPW FAM30B ZNF34 TMEM60 CCDC38 SLC25A24 SLC35F4
    ANKRD36 LRRC31 WDR36 TRIM26 RNF40 USP24 KLHL23 DNAJC22 MRPL27 MRPS30 KRT25 IL27 CCL25 CENPX
    FAM30C ZNF35 TMEM61 CCDC40 SLC25A25 SLC35F5 ANKRD37 LRRC32 WDR37 TRIM27 RNF41 USP25 KLHL24
    DNAJC24 MRPL28 MRPS31 KRT26 CD48 IL31 CCL26 FAM32A ZNF41 TMEM62 CCDC42 SLC25A26 SLC35F6
    ANKRD39 LRRC34 WDR38 TRIM28 RNF43 USP26 KLHL25 DNAJC25 MRPL30 MRPS33 KRT27 CD52 IL32 CCL27
    FAM41C ZNF43 TMEM64 CCDC43 SLC25A27 SLC35G1 ANKRD40 LRRC36 WDR41 TRIM29 RNF44 USP28 KLHL26
    DNAJC27 MRPL32 MRPS34 KRT28 CD53 IL33 CCL28 FAM43A ZNF44 TMEM65 CCDC47 SLC25A28 SLC35G2
    ANKRD42 LRRC38 WDR43 TRIM31 RNF103 USP29 KLHL28 DNAJC28 MRPL33 MRPS35 KRT31 CD55 IL34 FAM43B
    ZNF45 TMEM67 CCDC50 SLC25A29 SLC35G3 ANKRD44 LRRC39 WDR44 TRIM32 RNF111 USP30 KLHL29 DNAJC30
    MRPL34 MRPS36 KRT32 CD58 IL37 FAM47A ZNF48 TMEM68 CCDC51 SLC25A30 SLC35G4 ANKRD45 LRRC40 WDR45
    TRIM33 RNF112 USP31 KLHL30 MRPL35 KRT34 CD59 IL1A FAM47B ZNF57 TMEM69 CCDC54 SLC25A31 SLC35G5
    ANKRD46 LRRC41 WDR46 TRIM34 RNF114 USP32 KLHL31 MRPL36 KRT35 CD63 FAM47C ZNF66 TMEM70 CCDC57
    SLC25A32 SLC35G6 ANKRD49 LRRC42 WDR47 TRIM35 RNF115 USP33 KLHL32 MRPL37 KRT36 FAM50A ZNF69
    TMEM71 CCDC59 SLC25A33 ANKRD50 LRRC43 WDR48 TRIM36 RNF121 USP34 KLHL33 MRPL38 KRT37 FAM50B
    ZNF70 TMEM72 CCDC60 SLC25A34 ANKRD52 LRRC45 WDR49 TRIM37 RNF122 USP35 KLHL34 MRPL39 KRT38 CD70
    FAM53A ZNF71 TMEM74 CCDC61 SLC25A35 ANKRD53 LRRC46 WDR53 TRIM38 RNF123 USP36 KLHL35 MRPL40
    KRT39 CD72 IL17B FAM53B ZNF74 TMEM78 CCDC62 SLC25A36 ANKRD54 LRRC47 WDR54 TRIM39 RNF125 USP37
    KLHL36 MRPL41 KRT40 IL17C FAM53C ZNF76 TMEM79 CCDC63 SLC25A37 ANKRD55 LRRC49 WDR55 TRIM40
    RNF126 USP38 KLHL38 MRPL42 KRT71 IL23A FAM66A ZNF77 TMEM80 CCDC65 SLC25A38 ANKRD60 LRRC52
    WDR59 TRIM41 RNF128 USP39 KLHL40 MRPL43 KRT72 CD81 IL36A FAM66B ZNF79 TMEM81 CCDC66 SLC25A39
    ANKRD61 LRRC53 WDR62 TRIM42 RNF130 USP40 KLHL41 MRPL44 KRT73 CD82 IL36B FAM66C ZNF80 TMEM82
    CCDC68 SLC25A40 ANKRD62 LRRC55 WDR64 TRIM43 RNF133 USP41 KLHL42 MRPL45 KRT74 CD83 FAM72A ZNF81
    TMEM88 CCDC69 SLC25A41 ANKRD63 LRRC56 WDR70 TRIM44 RNF135 USP42 MRPL46 KRT75 CD84 FAM72B ZNF83
    TMEM89 CCDC70 SLC25A42 ANKRD65 LRRC57 WDR72 TRIM45 RNF138 USP43 MRPL47 KRT76 FAM72C ZNF84
    TMEM91 CCDC71 SLC25A43 LRRC58 WDR73 TRIM46 RNF139 USP44 MRPL48 KRT77 CD93 FAM76A ZNF85 TMEM92
    CCDC73 SLC25A44 LRRC59 WDR74 TRIM47 RNF141 USP45 MRPL49 KRT78 CD96 FAM76B ZNF90 TMEM94 CCDC77
    SLC25A45 LRRC61 WDR75 TRIM48 RNF145 USP46 MRPL50 KRT79 CD99 FAM78A ZNF91 TMEM95 CCDC78
    SLC25A46 LRRC63 WDR76 TRIM49 RNF146 USP47 MRPL51 KRT80 CD101 FAM78B ZNF92 TMEM97 CCDC80
    SLC25A47 LRRC66 WDR77 TRIM50 RNF148 USP48 MRPL52 KRT81 CD109 FAM81A ZNF93 TMEM98 CCDC81
    SLC25A48 LRRC69 WDR81 TRIM51 RNF149 USP49 MRPL53 KRT82 CD151 FAM81B ZNF98 TMEM100 CCDC82
    SLC25A51 LRRC70 WDR82 TRIM52 RNF150 USP50 MRPL54 KRT83 CD160 FAM83A ZNF99 TMEM101 CCDC83
    SLC25A52 LRRC71 WDR83 TRIM54 RNF151 USP51 MRPL55 KRT84 FAM83B ZNF100 TMEM102 CCDC86 SLC25A53
    LRRC72 WDR86 TRIM55 RNF152 USP53 MRPL57 KRT85 CD164 FAM83C ZNF101 TMEM104 CCDC87 LRRC73 WDR87
    TRIM56 RNF157 USP54 MRPL58 KRT86 CD177 FAM85B ZNF106 TMEM105 CCDC89 WDR88 TRIM58 RNF165 CD180
    FAM87A ZNF107 TMEM107 CCDC91 WDR89 TRIM59 RNF166 KRT6B CD200 FAM87B ZNF112 TMEM108 CCDC92
    WDR90 TRIM60 RNF167 KRT6C CD207 FAM89A ZNF114 TMEM109 CCDC93 WDR91 TRIM61 RNF168 KRT33A CD209
    FAM89B ZNF117 TMEM114 CCDC96 WDR93 TRIM62 RNF169 KRT33B CD226 FAM98A ZNF121 TMEM115 CCDC97
    WDR97 TRIM63 RNF170 CD244 FAM98B ZNF124 TMEM116 CCDC103 TRIM64 RNF175 CD247 FAM98C ZNF131
    TMEM117 CCDC105 TRIM65 RNF180 CD248 FAM99A ZNF132 TMEM119 CCDC106 TRIM66 RNF181 FAM99B ZNF133
    TMEM121 CCDC107 TRIM67 RNF182 CD276 FAM102A ZNF134 TMEM123 CCDC110 TRIM68 RNF183 CD1A FAM102B
    ZNF135 TMEM125 CCDC112 TRIM69 RNF185 CD1B FAM104A ZNF136 TMEM127 CCDC113 TRIM71 RNF186 CD1C
    FAM104B ZNF138 TMEM128 CCDC115 TRIM72 RNF187 FAM106A ZNF140 TMEM129 CCDC116 TRIM73 RNF207
    FAM106C ZNF141 TMEM130 CCDC117 TRIM74 RNF208 FAM107A ZNF142 TMEM131 CCDC120 RNF212 FAM107B
    ZNF143 TMEM134 CCDC121 RNF213 CD300A FAM110A ZNF146 TMEM135 CCDC122 RNF214 CD300C FAM110B
    ZNF148 TMEM138 CCDC124 RNF215 FAM110C ZNF154 TMEM139 CCDC125 RNF216 FAM111A ZNF155 TMEM140
    CCDC126 RNF217 FAM111B ZNF157 TMEM141 CCDC127 RNF220 FAM117A ZNF160 TMEM143 CCDC134 RNF222
    FAM117B ZNF165 TMEM144 CCDC136 RNF223 FAM118A ZNF169 TMEM145 CCDC137 RNF224 FAM118B ZNF174
    TMEM147 CCDC138 RNF225 FAM120A ZNF175 TMEM154 CCDC140 RNF227 FAM120B ZNF177 TMEM156 CCDC141
    FAM120C ZNF180 TMEM158 CCDC142 FAM124A ZNF181 TMEM160 CCDC146 FAM124B ZNF182 TMEM163 CCDC148
    FAM131A ZNF184 TMEM164 CCDC149 FAM131B ZNF185 TMEM165 CCDC150 FAM131C ZNF189 TMEM168 CCDC152
    FAM133A ZNF195 TMEM169 CCDC153 FAM133B ZNF197 TMEM171 CCDC154 FAM135A ZNF200 TMEM174 CCDC157
    FAM135B ZNF202 TMEM175 CCDC158 FAM136A ZNF205 TMEM177 CCDC159 FAM138A ZNF207 TMEM179 CCDC160
    FAM138B ZNF208 TMEM181 CCDC163 FAM138C ZNF211 TMEM182 CCDC166 FAM149A ZNF212
""".split())

_N_HIGH = GENE_SYMBOLS.index("RPSA") + 1
_HIGHLY_EXPRESSED = frozenset(GENE_SYMBOLS[:_N_HIGH])


def default_genes(n_genes: int = 2000) -> list[str]:
    """The first ``n_genes`` of :data:`GENE_SYMBOLS`, padded with ``GENE{i}`` past its end."""
    if n_genes < 1:
        raise ValueError(f"n_genes must be at least 1, got {n_genes}")
    genes = list(GENE_SYMBOLS[:n_genes])
    genes += [f"GENE{i}" for i in range(len(genes), n_genes)]
    return genes


def _resolve_genes(n_genes: int, genes: Sequence[str] | None) -> list[str]:
    if genes is None:
        return default_genes(n_genes)
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("genes is empty")
    seen: set[str] = set()
    dup = [g for g in genes if g in seen or seen.add(g)]
    if dup:
        raise ValueError(f"genes has duplicates, e.g. {dup[:3]}")
    return genes


# --------------------------------------------------------------------------------------------
# Generative model
# --------------------------------------------------------------------------------------------

_BLOCK_CELLS = 4096  # cells drawn at once: bounds the dense temporaries (~100 MB at 2k genes)
_MIN_CELLS_PER_SAMPLE = 3  # a scaled-down sample keeps a few cells
_N_STATES = 4  # cell states (types / programs) per dataset
_RESPONSE_FRACTION = 0.08  # share of genes in the core response program
_DATASET_RESPONSE_SHARE = 1 / 3  # extra, dataset-specific response genes relative to the core
_DEPTH = 1500  # mean counts per cell at 2,000 genes (grows as the square root of the panel)
_HIGH_SHARE = 0.4  # share of counts taken by housekeeping / ribosomal / mitochondrial genes
_MAX_LIFT = 4.0  # at most e^4-fold above a typical gene
_RESPONSE_LFC = 1.0  # median |log-fold change| (natural log) of a response gene at effect=1

_SENSITIVE, _RESISTANT = "sensitive", "resistant"
# Beta parameters of the per-cell response-program activity (x 1.2): mean 0.86 in resistant
# cells, 0.13 in sensitive ones, overlapping tails.
_ACTIVITY = {_RESISTANT: (5.0, 2.0), _SENSITIVE: (1.0, 8.0)}
_CONDITION = {"pre": "pre-treatment", "post": "post-treatment", "unspecified": "unspecified"}


class _Genes:
    """Gene parameters shared by every dataset of one cohort (one seed)."""

    def __init__(self, genes: list[str], seed: int):
        rng = np.random.default_rng([seed, 0])
        n = len(genes)
        self.names = genes
        # Log-normal relative means; housekeeping, ribosomal and mitochondrial genes lifted to
        # take ~40 % of the counts, as in real UMI data, whatever the panel size (the lift is
        # capped so that a panel with only a few of them does not hand them everything).
        log_mean = rng.normal(0.0, 1.3, n)
        high = np.fromiter((g in _HIGHLY_EXPRESSED or g.startswith("MT-") for g in genes), bool, n)
        if high.any() and (~high).any():
            ratio = np.exp(log_mean[~high]).sum() / np.exp(log_mean[high]).sum()
            lift = np.log(ratio * _HIGH_SHARE / (1 - _HIGH_SHARE))
            log_mean[high] += np.clip(lift, 0.0, _MAX_LIFT)
        self.log_mean = log_mean
        # Gene-wise NB dispersion (var = mu + phi mu^2), typical of UMI data.
        self.dispersion = np.exp(rng.normal(np.log(0.2), 0.5, n))
        # Response genes are drawn from the expressed half of the other genes: a program of
        # undetectable genes would be no program.
        low = np.flatnonzero(~high)
        pool = low if len(low) >= 20 else np.arange(n)
        candidates = pool[log_mean[pool] >= np.median(log_mean[pool])]
        self.candidates = candidates
        n_resp = min(len(candidates), max(10, round(_RESPONSE_FRACTION * n)))
        self.response_idx = np.sort(rng.choice(candidates, n_resp, replace=False))
        sign = np.where(np.arange(n_resp) % 2 == 0, 1.0, -1.0)
        rng.shuffle(sign)
        self.response_lfc = sign * np.exp(rng.normal(np.log(_RESPONSE_LFC), 0.3, n_resp))


class _Sample(NamedTuple):
    sample_id: str
    patient_id: str
    condition: str
    response: str
    n_cells: int


def _split_cells(n_cells: int, n_parts: int, rng: np.random.Generator) -> np.ndarray:
    """Uneven but exact split of a class's cells between its samples."""
    floor = min(_MIN_CELLS_PER_SAMPLE, n_cells // n_parts)
    rest = n_cells - floor * n_parts
    weights = rng.dirichlet(np.full(n_parts, 8.0))
    return floor + rng.multinomial(rest, weights)


def _layout(name: str, n_sens_cells: int, n_res_cells: int, n_sens_samples: int,
            n_res_samples: int, n_patients: int, timepoint: str,
            rng: np.random.Generator) -> list[_Sample]:
    """Samples of one dataset; every sample has one label.

    ``timepoint``: ``"pre/post"`` - sensitive samples are pre-treatment and resistant ones
    post-treatment samples of the same ``n_patients`` cell lines / patients; ``"paired"`` - each
    patient gives a pre- and a post-treatment sample, both with the patient's label;
    ``"pre"``, ``"post"``, ``"unspecified"`` - one patient per sample.
    """
    samples = []
    k = 0
    patient = 0
    for response, n_cells, n_samp in ((_SENSITIVE, n_sens_cells, n_sens_samples),
                                      (_RESISTANT, n_res_cells, n_res_samples)):
        if n_samp == 0:
            continue
        for j, c in enumerate(_split_cells(n_cells, n_samp, rng)):
            if timepoint == "pre/post":
                pid = j % n_patients
                condition = "pre-treatment" if response == _SENSITIVE else "post-treatment"
            elif timepoint == "paired":
                pid = patient + j // 2
                condition = "pre-treatment" if j % 2 == 0 else "post-treatment"
            else:
                pid = k
                condition = _CONDITION[timepoint]
            samples.append(_Sample(f"{name}_S{k + 1}", f"{name}_P{pid + 1}", condition,
                                   response, int(c)))
            k += 1
        patient += (n_samp + 1) // 2
    return samples


def _simulate_dataset(name: str, samples: list[_Sample], genes: _Genes, meta: dict,
                      rng: np.random.Generator, effect: float, batch_effect: float,
                      dataset_effect: float, seed: int) -> ad.AnnData:
    n_genes = len(genes.names)
    # Dataset: platform / tissue shift of gene means, sequencing depth, cell states and its own
    # variant of the response program.
    base = genes.log_mean + rng.normal(0.0, dataset_effect, n_genes)
    log_depth = np.log(_DEPTH * np.sqrt(n_genes / 2000)) + rng.normal(0.0, 0.6 * dataset_effect)
    state_lfc = np.where(rng.random((_N_STATES, n_genes)) < 0.1,
                         rng.normal(0.0, 1.0, (_N_STATES, n_genes)), 0.0).astype(np.float32)
    state_mix = rng.dirichlet(np.full(_N_STATES, 2.0))
    lfc = np.zeros(n_genes)
    lfc[genes.response_idx] = genes.response_lfc * rng.normal(1.0, 0.25, len(genes.response_idx))
    n_own = max(1, round(_DATASET_RESPONSE_SHARE * len(genes.response_idx)))
    own = rng.choice(genes.candidates, min(n_own, len(genes.candidates)), replace=False)
    lfc[own] += rng.choice([-1.0, 1.0], len(own)) * np.exp(
        rng.normal(np.log(_RESPONSE_LFC), 0.3, len(own)))
    program = np.flatnonzero(lfc)  # kept as ground truth even at effect=0
    lfc *= effect
    lfc32 = lfc.astype(np.float32)

    patients = {s.patient_id for s in samples}
    patient_shift = {p: rng.normal(0.0, batch_effect, n_genes) for p in sorted(patients)}
    shape = (1.0 / genes.dispersion).astype(np.float32)
    disp = genes.dispersion.astype(np.float32)

    blocks, obs_parts = [], []
    for s in samples:
        sample_base = (base + patient_shift[s.patient_id]
                       + rng.normal(0.0, batch_effect, n_genes)).astype(np.float32)
        sample_depth = log_depth + rng.normal(0.0, 0.15)
        mix = rng.dirichlet(20.0 * state_mix + 0.5)
        done = 0
        while done < s.n_cells:
            b = min(_BLOCK_CELLS, s.n_cells - done)
            state = rng.choice(_N_STATES, b, p=mix)
            # Program activity per cell: strong in most resistant cells, weak in a few
            # sensitive ones (persisters), so classes overlap as they do in real data.
            alpha, beta = _ACTIVITY[s.response]
            activity = (rng.beta(alpha, beta, b) * 1.2).astype(np.float32)
            logit = sample_base + state_lfc[state]
            logit += np.outer(activity, lfc32)
            logit -= logit.max(axis=1, keepdims=True)
            mu = np.exp(logit, out=logit)
            depth = np.exp(sample_depth + rng.normal(0.0, 0.4, b))
            mu *= (depth / mu.sum(axis=1))[:, None].astype(np.float32)
            # Gamma-Poisson = negative binomial with mean mu and dispersion phi.
            mu *= rng.standard_gamma(shape, size=mu.shape, dtype=np.float32)
            mu *= disp
            counts = rng.poisson(mu).astype(np.int32)
            blocks.append(sp.csr_matrix(counts))
            obs_parts.append((s, b))
            done += b

    X = sp.vstack(blocks, format="csr", dtype=np.int32) if blocks else \
        sp.csr_matrix((0, n_genes), dtype=np.int32)
    n_cells = X.shape[0]
    cols = {k: np.repeat([getattr(s, k) for s, _ in obs_parts], [b for _, b in obs_parts])
            for k in ("response", "sample_id", "patient_id", "condition")}
    obs = pd.DataFrame(
        {
            "response": pd.Categorical(cols["response"], categories=[_SENSITIVE, _RESISTANT]),
            "sample_id": pd.Categorical(cols["sample_id"]),
            "patient_id": pd.Categorical(cols["patient_id"]),
            "condition": pd.Categorical(cols["condition"]),
            "dataset": pd.Categorical([name] * n_cells),
        },
        index=pd.Index([f"{name}_c{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index(genes.names))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["dataset"] = dict(meta)
    adata.uns["simulation"] = {
        "response_genes": np.asarray([genes.names[i] for i in program], dtype=object),
        "response_lfc": lfc[program],
        "effect": float(effect),
        "batch_effect": float(batch_effect),
        "dataset_effect": float(dataset_effect),
        "seed": int(seed),
    }
    return adata


def _check_params(effect: float, batch_effect: float, dataset_effect: float) -> None:
    if effect < 0 or batch_effect < 0 or dataset_effect < 0:
        raise ValueError("effect, batch_effect and dataset_effect must be non-negative")


def _meta(row: PaperDataset, **extra) -> dict:
    return {
        "drug": row.regimen,
        "regimen": row.regimen,
        "cancer_type": row.cancer_type,
        "tissue": row.tissue,
        "therapy": row.therapy,
        **extra,
    }


# Templates for simulate_cohort: alternate cell-line-like and patient datasets of the paper.
_COHORT_TEMPLATES = ("Data11", "Data20", "Data34", "Data5", "Data10", "Data22", "Data32", "Data25")


def simulate_cohort(n_datasets: int = 4, cells_per_dataset: int = 500,
                    samples_per_dataset: int = 4, n_genes: int = 2000,
                    genes: Sequence[str] | None = None, effect: float = 1.0,
                    batch_effect: float = 0.3, resistant_fraction: float = 0.5,
                    dataset_effect: float = 0.5, seed: int = 0,
                    ) -> list[tuple[str, ad.AnnData, dict]]:
    """A small cohort of ``n_datasets`` datasets, as ``(name, adata, metadata)`` tuples.

    Datasets alternate between the cell-line design (one or two cell lines, pre-treatment
    samples ``sensitive``, post-treatment samples ``resistant``) and the patient design (one
    label per patient, two samples per patient where possible), taking their metadata from
    datasets of the paper. ``genes`` (a list of symbols) overrides ``n_genes``. A fraction
    ``resistant_fraction`` of the samples, and about that of the cells, are resistant.
    """
    _check_params(effect, batch_effect, dataset_effect)
    if n_datasets < 1:
        raise ValueError(f"n_datasets must be at least 1, got {n_datasets}")
    if samples_per_dataset < 2:
        raise ValueError("samples_per_dataset must be at least 2 (one per class)")
    if not 0.0 < resistant_fraction < 1.0:
        raise ValueError("resistant_fraction must be strictly between 0 and 1")
    if cells_per_dataset < 2 * samples_per_dataset:
        raise ValueError("cells_per_dataset must be at least 2 per sample")
    gene_model = _Genes(_resolve_genes(n_genes, genes), seed)
    by_name = {r.name: r for r in PAPER_DATASETS}
    n_res_s = min(max(round(resistant_fraction * samples_per_dataset), 1), samples_per_dataset - 1)
    n_sens_s = samples_per_dataset - n_res_s
    n_res_c = round(resistant_fraction * cells_per_dataset)
    n_res_c = min(max(n_res_c, n_res_s), cells_per_dataset - n_sens_s)
    n_sens_c = cells_per_dataset - n_res_c
    out = []
    for d in range(n_datasets):
        row = by_name[_COHORT_TEMPLATES[d % len(_COHORT_TEMPLATES)]]
        rng = np.random.default_rng([seed, 1, d])
        name = f"SimData{d + 1}"
        if d % 2 == 0:  # cell-line design
            timepoint = "pre/post"
            n_patients = max(1, min(n_sens_s, n_res_s) // 2)
        else:  # patient design: a patient's pre and post samples share its label
            timepoint, n_patients = "paired", 0
        samples = _layout(name, n_sens_c, n_res_c, n_sens_s, n_res_s, n_patients, timepoint, rng)
        meta = _meta(row, template=row.name)
        adata = _simulate_dataset(name, samples, gene_model, meta, rng, effect, batch_effect,
                                  dataset_effect, seed)
        out.append((name, adata, meta))
    return out


def simulate_paper_collection(scale: float = 1.0, n_genes: int = 2000,
                              genes: Sequence[str] | None = None, effect: float = 1.0,
                              batch_effect: float = 0.3, dataset_effect: float = 0.5,
                              seed: int = 0) -> Iterator[tuple[str, ad.AnnData, dict]]:
    """Lazily yield the 36 datasets of :data:`PAPER_DATASETS` as ``(name, adata, metadata)``.

    Each dataset has the table's sensitive and resistant cell counts times ``scale`` (exactly
    the table at ``scale=1``: 326,751 cells), its samples, patients and label design. Scaled
    down, every sample keeps at least a few cells, so small classes are over-represented. Each
    dataset has its own random stream: any one is the same however far the generator is run.
    """
    _check_params(effect, batch_effect, dataset_effect)
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    gene_model = _Genes(_resolve_genes(n_genes, genes), seed)
    # Checked above, generated below: bad arguments fail at the call, not at the first next().
    return _paper_datasets(scale, gene_model, effect, batch_effect, dataset_effect, seed)


def _paper_datasets(scale, gene_model, effect, batch_effect, dataset_effect, seed):
    for d, row in enumerate(PAPER_DATASETS):
        rng = np.random.default_rng([seed, 2, d])
        n_sens = _scaled(row.sensitive, row.n_sensitive_samples, scale)
        n_res = _scaled(row.resistant, row.n_resistant_samples, scale)
        samples = _layout(row.name, n_sens, n_res, row.n_sensitive_samples,
                          row.n_resistant_samples, row.n_patients, row.timepoint, rng)
        meta = _meta(row, accession=row.accession)
        adata = _simulate_dataset(row.name, samples, gene_model, meta, rng, effect,
                                  batch_effect, dataset_effect, seed)
        yield row.name, adata, meta


def _scaled(n_cells: int, n_samples: int, scale: float) -> int:
    if n_cells == 0 or n_samples == 0:
        return 0
    return max(round(n_cells * scale), _MIN_CELLS_PER_SAMPLE * n_samples)


def write_cohort(datasets: Iterable[tuple], out_dir: str | Path) -> list[Path]:
    """Write each ``(name, adata, ...)`` to ``out_dir/<name>.h5ad``; consumes generators lazily."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in datasets:
        name, adata = item[0], item[1]
        path = out_dir / f"{name}.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
    return paths
