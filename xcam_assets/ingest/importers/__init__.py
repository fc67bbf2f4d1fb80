"""Importers: public PNG datasets -> DICOM arrival batches (+ labels.csv)."""
