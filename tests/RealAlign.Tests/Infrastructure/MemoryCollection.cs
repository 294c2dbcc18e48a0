namespace RealAlign.Tests.Infrastructure;

/// <summary>
/// Tests that measure this process's resident memory run alone (xUnit runs a non-parallel collection
/// after the parallel ones), so other tests' allocations do not move the measurement.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class MemoryMeasurementCollection
{
    public const string Name = "memory-measurement";
}
