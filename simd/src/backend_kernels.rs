/// Defines the `#[target_feature]` entry points of one backend over its
/// [`Vector`](crate::vector::Vector) type and the [`Kernels`](crate::Kernels)
/// table that exposes them.
///
/// The table's functions are safe to call only on CPUs with `$feature`; the
/// table is therefore handed out solely by
/// [`Backend::kernels`](crate::Backend::kernels), after runtime detection.
macro_rules! backend_kernels {
    ($backend:expr, $vector:ty, $($feature:literal),+) => {
        #[target_feature($(enable = $feature),+)]
        unsafe fn is_zero_tf(buf: &[u8]) -> bool {
            // SAFETY: the caller guarantees the target features.
            unsafe { crate::generic::is_zero::<$vector>(buf) }
        }

        #[target_feature($(enable = $feature),+)]
        unsafe fn diff_mask_tf(a: &[u8], b: &[u8], masks: &mut [u64], summary: &mut [u64]) -> bool {
            // SAFETY: the caller guarantees the target features and lengths.
            unsafe { crate::generic::diff_mask::<$vector>(a, b, masks, summary) }
        }

        #[target_feature($(enable = $feature),+)]
        unsafe fn find_tf<const EQUAL: bool>(a: &[u8], b: &[u8]) -> usize {
            // SAFETY: the caller guarantees the target features and lengths.
            unsafe { crate::generic::find::<$vector, EQUAL>(a, b) }
        }

        /// [`crate::generic::for_each_diff`] on this backend.
        ///
        /// # Safety
        /// The CPU supports this backend; `a.len() == b.len()`.
        #[target_feature($(enable = $feature),+)]
        #[inline]
        pub(crate) unsafe fn for_each_diff<E, F>(a: &[u8], b: &[u8], f: &mut F) -> Result<bool, E>
        where
            F: crate::DiffWindowSink<E>,
        {
            // SAFETY: the caller guarantees the target features and lengths.
            unsafe { crate::generic::for_each_diff::<$vector, E, F>(a, b, f) }
        }

        fn is_zero(buf: &[u8]) -> bool {
            // SAFETY: this table is only reachable through `Backend::kernels`,
            // which checked the CPU features at runtime.
            unsafe { is_zero_tf(buf) }
        }

        fn diff_mask(a: &[u8], b: &[u8], masks: &mut [u64], summary: &mut [u64]) -> bool {
            // SAFETY: as for `is_zero`; `Kernels::diff_mask`, the only
            // caller, checked the lengths (`check_mask_args`).
            unsafe { diff_mask_tf(a, b, masks, summary) }
        }

        fn find_diff(a: &[u8], b: &[u8]) -> usize {
            // SAFETY: as for `is_zero`; `Kernels::find_diff`, the only
            // caller, cut both slices to the same length.
            unsafe { find_tf::<false>(a, b) }
        }

        fn find_equal(a: &[u8], b: &[u8]) -> usize {
            // SAFETY: as for `is_zero`; `Kernels::find_equal`, the only
            // caller, cut both slices to the same length.
            unsafe { find_tf::<true>(a, b) }
        }

        pub(crate) static KERNELS: crate::Kernels = crate::Kernels {
            backend: $backend,
            is_zero,
            diff_mask,
            find_diff,
            find_equal,
        };
    };
}
