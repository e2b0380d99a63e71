//! Exact ranking metrics for anomaly detection and segmentation.
//!
//! Every metric sorts (score, label) pairs once, walks the distinct thresholds from the
//! highest score down and treats tied scores as one threshold, as scikit-learn does. Pairs
//! are 8 bytes, so a full MVTec category's pixels (≈ 10⁸) fit in under 1 GiB. A metric
//! that is undefined on its input (one class only, no regions) is an error, never a NaN
//! in a report or a panic.

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetricError {
    #[error("{metric}: scores ({scores}) and labels ({labels}) differ in length")]
    Length { metric: &'static str, scores: usize, labels: usize },
    #[error("{metric}: undefined with only {class} samples ({count}); need both normal and anomalous")]
    OneClass { metric: &'static str, class: &'static str, count: usize },
    #[error("{metric}: a score is NaN")]
    NaN { metric: &'static str },
}

/// `(threshold, false positives, true positives)` after each distinct threshold, then the
/// totals of negatives and positives.
type Counts = (Vec<(f32, u64, u64)>, u64, u64);

/// Points `(false positives, true positives)` after each distinct threshold, descending.
fn cumulative_counts(metric: &'static str, scores: &[f32], labels: &[bool]) -> Result<Counts, MetricError> {
    if scores.len() != labels.len() {
        return Err(MetricError::Length { metric, scores: scores.len(), labels: labels.len() });
    }
    if scores.iter().any(|s| s.is_nan()) {
        return Err(MetricError::NaN { metric });
    }
    let positives = labels.iter().filter(|l| **l).count() as u64;
    let negatives = labels.len() as u64 - positives;
    if positives == 0 {
        return Err(MetricError::OneClass { metric, class: "normal", count: labels.len() });
    }
    if negatives == 0 {
        return Err(MetricError::OneClass { metric, class: "anomalous", count: labels.len() });
    }
    let mut pairs: Vec<(f32, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    pairs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut points = Vec::new();
    let (mut fp, mut tp) = (0u64, 0u64);
    for (i, (score, label)) in pairs.iter().enumerate() {
        if *label {
            tp += 1;
        } else {
            fp += 1;
        }
        if i + 1 == pairs.len() || pairs[i + 1].0 != *score {
            points.push((*score, fp, tp));
        }
    }
    Ok((points, positives, negatives))
}

/// Area under the ROC curve (trapezoidal over distinct thresholds; ties count half).
pub fn auroc(scores: &[f32], labels: &[bool]) -> Result<f64, MetricError> {
    let (points, p, n) = cumulative_counts("AUROC", scores, labels)?;
    let mut area = 0.0;
    let (mut fp0, mut tp0) = (0u64, 0u64);
    for (_, fp, tp) in points {
        area += (fp - fp0) as f64 * (tp + tp0) as f64 / 2.0;
        (fp0, tp0) = (fp, tp);
    }
    Ok(area / (p as f64 * n as f64))
}

/// Average precision, `Σ (Rₙ − Rₙ₋₁)·Pₙ` (scikit-learn's `average_precision_score`).
pub fn average_precision(scores: &[f32], labels: &[bool]) -> Result<f64, MetricError> {
    let (points, p, _) = cumulative_counts("AP", scores, labels)?;
    let mut ap = 0.0;
    let mut recall0 = 0.0;
    for (_, fp, tp) in points {
        let recall = tp as f64 / p as f64;
        ap += (recall - recall0) * tp as f64 / (tp + fp) as f64;
        recall0 = recall;
    }
    Ok(ap)
}

/// Best F1 over all thresholds and the threshold reaching it (predicted positive: `score ≥ t`).
pub fn best_f1(scores: &[f32], labels: &[bool]) -> Result<(f64, f32), MetricError> {
    let (points, p, _) = cumulative_counts("F1", scores, labels)?;
    let mut best = (0.0, f32::INFINITY);
    for (score, fp, tp) in points {
        let f1 = 2.0 * tp as f64 / (2 * tp + fp + (p - tp)) as f64;
        if f1 > best.0 {
            best = (f1, score);
        }
    }
    Ok(best)
}

/// Area under the per-region-overlap curve up to `fpr_limit` (0.3 in MVTec AD), divided by
/// the limit. `region_labels[p]` is 0 for normal pixels and the ground-truth component
/// (1-based, unique across images) otherwise; PRO is the mean over components of the
/// covered fraction. The curve is cut at the limit by linear interpolation.
pub fn aupro(scores: &[f32], region_labels: &[u32], fpr_limit: f64) -> Result<f64, MetricError> {
    const METRIC: &str = "AUPRO";
    if scores.len() != region_labels.len() {
        return Err(MetricError::Length { metric: METRIC, scores: scores.len(), labels: region_labels.len() });
    }
    if scores.iter().any(|s| s.is_nan()) {
        return Err(MetricError::NaN { metric: METRIC });
    }
    let regions = region_labels.iter().copied().max().unwrap_or(0) as usize;
    let mut sizes = vec![0u64; regions + 1];
    for &r in region_labels {
        sizes[r as usize] += 1;
    }
    let negatives = sizes[0];
    let present = sizes[1..].iter().filter(|s| **s > 0).count();
    if present == 0 {
        return Err(MetricError::OneClass { metric: METRIC, class: "normal", count: scores.len() });
    }
    if negatives == 0 {
        return Err(MetricError::OneClass { metric: METRIC, class: "anomalous", count: scores.len() });
    }
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_unstable_by(|a, b| scores[*b as usize].total_cmp(&scores[*a as usize]));
    let mut covered = vec![0u64; regions + 1];
    let (mut fp, mut pro_sum) = (0u64, 0.0f64);
    let (mut fpr0, mut pro0, mut area) = (0.0f64, 0.0f64, 0.0f64);
    for (i, &p) in order.iter().enumerate() {
        let r = region_labels[p as usize] as usize;
        if r == 0 {
            fp += 1;
        } else {
            covered[r] += 1;
            pro_sum += 1.0 / sizes[r] as f64;
        }
        let last_of_tie = i + 1 == order.len() || scores[order[i + 1] as usize] != scores[p as usize];
        if !last_of_tie {
            continue;
        }
        let (fpr, pro) = (fp as f64 / negatives as f64, pro_sum / present as f64);
        if fpr >= fpr_limit {
            let pro_at_limit = pro0 + (pro - pro0) * (fpr_limit - fpr0) / (fpr - fpr0).max(f64::MIN_POSITIVE);
            area += (fpr_limit - fpr0) * (pro0 + pro_at_limit) / 2.0;
            return Ok(area / fpr_limit);
        }
        area += (fpr - fpr0) * (pro0 + pro) / 2.0;
        (fpr0, pro0) = (fpr, pro);
    }
    Ok(area / fpr_limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values from scikit-learn 1.x:
    //   y = [0,0,1,1,0,1,0,0,1,0]; s = [0.1,0.4,0.35,0.8,0.4,0.9,0.2,0.4,0.4,0.05]
    //   roc_auc_score(y, s) = 0.8125; average_precision_score(y, s) = 0.7678571428571428
    //   y2 = [1,0,1,0,0,0,1,1]; s2 = [0.5,0.5,0.5,0.2,0.9,0.1,0.7,0.3]
    //   roc_auc_score = 0.625; average_precision_score = 0.5916666666666667
    fn case1() -> (Vec<f32>, Vec<bool>) {
        let y = [0, 0, 1, 1, 0, 1, 0, 0, 1, 0];
        (vec![0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.2, 0.4, 0.4, 0.05], y.iter().map(|v| *v == 1).collect())
    }

    #[test]
    fn auroc_and_ap_match_scikit_learn_with_ties() {
        let (s, y) = case1();
        assert!((auroc(&s, &y).unwrap() - 0.8125).abs() < 1e-12);
        assert!((average_precision(&s, &y).unwrap() - 0.7678571428571428).abs() < 1e-12);
        let y2: Vec<bool> = [1, 0, 1, 0, 0, 0, 1, 1].iter().map(|v| *v == 1).collect();
        let s2 = [0.5, 0.5, 0.5, 0.2, 0.9, 0.1, 0.7, 0.3];
        assert!((auroc(&s2, &y2).unwrap() - 0.625).abs() < 1e-12);
        assert!((average_precision(&s2, &y2).unwrap() - 0.5916666666666667).abs() < 1e-12);
    }

    #[test]
    fn best_f1_finds_its_threshold() {
        let (s, y) = case1();
        // At t = 0.35: tp = 4, fp = 3 → F1 = 8/11.
        let (f1, t) = best_f1(&s, &y).unwrap();
        assert!((f1 - 8.0 / 11.0).abs() < 1e-12 && t == 0.35, "{f1} {t}");
    }

    #[test]
    fn undefined_cases_are_errors() {
        assert_eq!(
            auroc(&[0.1, 0.2], &[false, false]),
            Err(MetricError::OneClass { metric: "AUROC", class: "normal", count: 2 })
        );
        assert!(matches!(average_precision(&[0.1], &[true]), Err(MetricError::OneClass { class: "anomalous", .. })));
        assert!(matches!(auroc(&[0.1], &[true, false]), Err(MetricError::Length { .. })));
        assert!(matches!(auroc(&[f32::NAN, 0.1], &[true, false]), Err(MetricError::NaN { .. })));
        assert!(matches!(aupro(&[0.1, 0.2], &[0, 0], 0.3), Err(MetricError::OneClass { .. })));
    }

    #[test]
    fn aupro_matches_a_brute_force_sweep() {
        // Brute force in Python/numpy over every distinct threshold, two regions
        // ({0,1,4} and {7,11}), trapezoid to FPR 0.3, divided by 0.3: 0.880952380952381.
        let scores = [0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.2, 0.6, 0.1, 0.2, 0.5, 0.4];
        let labels = [1, 1, 0, 0, 1, 0, 0, 2, 0, 0, 0, 2];
        assert!((aupro(&scores, &labels, 0.3).unwrap() - 0.880952380952381).abs() < 1e-12);
        // A perfect map covers every region before any false positive.
        let perfect: Vec<f32> = labels.iter().map(|l| if *l > 0 { 1.0 } else { 0.0 }).collect();
        assert!((aupro(&perfect, &labels, 0.3).unwrap() - 1.0).abs() < 1e-12);
    }
}
